-- The smallest engine: answers every message with "re: " and its text.
-- Used by tests and benchmarks.
local M = {}

function M.get_opening(ctx)
  return "hello " .. (ctx.contact.first_name or ctx.contact.username or "there")
end

function M.get_response(ctx, message)
  return "re: " .. message.text
end

function M.get_follow_up(ctx)
  if ctx.dialog.follow_ups_sent < 1 then
    return "still there?"
  end
  return nil
end

function M.is_dialog_dead(ctx)
  return true
end

return M
