-- Simulated contacts for the sim transport. Each contact has a temper derived
-- from its identity, so a run with the same seed replays the same people:
--   eager    asks about price, then books
--   curious  asks questions, then drifts away
--   grumpy   says no, sometimes asks to stop
local P = {}

local function temper(contact)
  local key = contact.username or contact.phone or tostring(contact.user_id or "")
  local h = 0
  for i = 1, #key do
    h = (h * 31 + string.byte(key, i)) % 1000003
  end
  local tempers = { "eager", "eager", "curious", "curious", "grumpy" }
  return tempers[h % #tempers + 1]
end

local SCRIPTS = {
  eager = { "Hi! Sounds interesting, tell me more", "How much does it cost?", "Thursday works for me, let's book it" },
  curious = { "What is it about?", "How does it work with our current tools?", "Hmm, I'll think about it" },
  grumpy = { "Not interested, thanks", "stop writing to me" },
}

function P.get_response(ctx, message)
  local state = ctx.state
  state.temper = state.temper or temper(ctx.contact)
  state.step = (state.step or 0) + 1
  local lines = SCRIPTS[state.temper]
  return lines[state.step]
end

return P
