-- An engine that lets a language model talk, through any OpenAI-compatible
-- chat completions endpoint. The campaign's prompt template, rendered with
-- ctx, is the system message; the dialog history is the conversation.
--
-- Campaign params used:
--   llm_base_url     (default "https://api.openai.com/v1")
--   llm_model        (default "gpt-4o-mini")
--   llm_api_key_env  (default "OPENAI_API_KEY"; must be in [engines] env_allow)
--   opening          the first message; without it the template renders it

local llm = require("llm")
local template = require("template")

local M = {}

local function client(ctx)
  local p = ctx.campaign.params or {}
  return {
    base_url = p.llm_base_url or "https://api.openai.com/v1",
    model = p.llm_model or "gpt-4o-mini",
    api_key_env = p.llm_api_key_env or "OPENAI_API_KEY",
    temperature = p.llm_temperature or 0.7,
    max_tokens = p.llm_max_tokens or 300,
    timeout = p.llm_timeout or 30,
  }
end

local DONE = "%[DONE:([%w_]+)%]"

-- The model may end its answer with [DONE:outcome] to finish the dialog.
local function shape(text)
  local outcome = string.match(text, DONE)
  if outcome then
    text = string.gsub(text, DONE, "")
    text = string.gsub(text, "%s+$", "")
    if text == "" then
      return { finish = outcome }
    end
    return { text = text, finish = outcome }
  end
  return text
end

function M.get_opening(ctx)
  local p = ctx.campaign.params or {}
  if p.opening then
    return template.render(p.opening, ctx, nil, { escape = false })
  end
  return nil
end

function M.get_response(ctx, message)
  return shape(llm.chat(client(ctx), ctx))
end

function M.get_follow_up(ctx)
  if ctx.dialog.follow_ups_sent >= 1 then
    return nil
  end
  return shape(llm.chat(client(ctx), ctx, {
    instruction = "The contact has not answered for a while. Write one short, friendly follow-up.",
  }))
end

function M.is_dialog_dead(ctx)
  return ctx.dialog.follow_ups_sent >= 1
end

return M
