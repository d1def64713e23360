-- Chat completions against any OpenAI-compatible endpoint.
--
--   local llm = require("llm")
--   local text = llm.chat({
--     base_url = "https://api.openai.com/v1",   -- or a local server
--     model = "gpt-4o-mini",
--     api_key_env = "OPENAI_API_KEY",           -- must be in [engines] env_allow; nil for none
--     temperature = 0.7, max_tokens = 300, timeout = 30,
--   }, ctx, { instruction = "optional extra system message" })
--
-- The campaign's prompt template, rendered with ctx (no HTML escaping), is
-- the system message; ctx.history becomes the conversation (what the account
-- sent is "assistant", what the contact sent is "user"). HTTP and API errors
-- are raised as Lua errors with the status and the provider's message.

local http = require("http")
local json = require("json")
local env = require("env")
local template = require("template")

local M = {}

--- The chat messages for a dialog.
function M.messages(ctx, opts)
  local messages = {}
  if ctx.prompt_template and ctx.prompt_template ~= "" then
    messages[#messages + 1] = {
      role = "system",
      content = template.render(ctx.prompt_template, ctx, nil, { escape = false }),
    }
  end
  for _, h in ipairs(ctx.history or {}) do
    messages[#messages + 1] = { role = h.direction == "out" and "assistant" or "user", content = h.text }
  end
  if opts and opts.instruction then
    messages[#messages + 1] = { role = "system", content = opts.instruction }
  end
  return messages
end

local function provider_message(body)
  local ok, decoded = pcall(json.decode, body)
  if ok and type(decoded) == "table" then
    local e = decoded.error
    if type(e) == "table" and e.message then
      return e.message
    elseif type(e) == "string" then
      return e
    elseif decoded.message then
      return decoded.message
    end
  end
  local text = tostring(body or ""):gsub("%s+", " ")
  if #text > 200 then
    text = text:sub(1, 200) .. "..."
  end
  return text
end

--- One chat completion; returns the assistant's text.
function M.chat(client, ctx, opts)
  assert(type(client) == "table", "llm.chat: the first argument is the client settings")
  assert(client.model, "llm.chat: model is required")
  local base = (client.base_url or "https://api.openai.com/v1"):gsub("/+$", "")
  local headers = { ["content-type"] = "application/json" }
  if client.api_key_env then
    local key = env.get(client.api_key_env)
    if not key or key == "" then
      error("llm: environment variable " .. client.api_key_env .. " is not set", 2)
    end
    headers["authorization"] = "Bearer " .. key
  end
  local body = {
    model = client.model,
    messages = M.messages(ctx, opts),
    temperature = client.temperature,
    max_tokens = client.max_tokens,
  }
  local res = http.request({
    method = "POST",
    url = base .. "/chat/completions",
    headers = headers,
    json = body,
    timeout = client.timeout or 30,
  })
  if res.status < 200 or res.status >= 300 then
    error("llm: HTTP " .. res.status .. ": " .. provider_message(res.body), 2)
  end
  local ok, decoded = pcall(json.decode, res.body)
  if not ok or type(decoded) ~= "table" then
    error("llm: the answer is not JSON: " .. provider_message(res.body), 2)
  end
  local choice = decoded.choices and decoded.choices[1]
  local content = choice and choice.message and choice.message.content
  if type(content) ~= "string" then
    error("llm: the answer has no choices[1].message.content", 2)
  end
  return content
end

return M
