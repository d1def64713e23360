-- Answers every message at length, so that a send stands out on the wire
-- from the library's own small requests (the crash cases of
-- tests/telegram_server.rs watch the server's socket for it). The filler
-- is pseudo-random hex: the library gzips large requests, and a repeated
-- phrase would shrink to nothing.
local M = {}

local function filler(seed, words)
  local x, out = seed, {}
  for i = 1, words do
    x = (x * 1103515245 + 12345) % 2147483648
    out[i] = string.format("%08x", x)
  end
  return table.concat(out, " ")
end

function M.get_opening(ctx)
  return "Hello " .. (ctx.contact.first_name or "there") .. ", a question for you."
end

function M.get_response(ctx, message)
  ctx.state.turns = (ctx.state.turns or 0) + 1
  return "Answer " .. ctx.state.turns .. " to \"" .. message.text .. "\": " .. filler(ctx.state.turns, 150)
end

function M.get_follow_up(ctx)
  return nil
end

function M.is_dialog_dead(ctx)
  return false
end

return M
