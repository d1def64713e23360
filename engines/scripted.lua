-- A rule-based sales funnel.
--
-- Stages, kept in ctx.state.stage:
--   pitched   the opening went out (the campaign's prompt template)
--   qualified the contact showed interest; we offered a demo slot
--   pricing   the contact asked about price; we answered and offered a demo
-- Outcomes through `finish`: "booked", "not_interested".
-- Follow-ups nudge by stage; after two the reviver may declare the dialog dead.

local M = {}

-- Keyword intents, checked in order; the first match wins.
local INTENTS = {
  { name = "negative", words = { "not interested", "no thanks", "no, thanks", "nope", "don't need", "do not need", "not now", "busy" } },
  { name = "book",     words = { "book", "schedule", "let's do", "lets do", "tomorrow", "monday", "tuesday", "wednesday", "thursday", "friday", "works for me", "sounds good" } },
  { name = "price",    words = { "price", "pricing", "cost", "how much", "expensive", "budget" } },
  { name = "positive", words = { "yes", "sure", "interested", "tell me more", "ok", "okay", "maybe", "what is it", "what's it about", "how does it work" } },
  { name = "question", words = { "?" } },
}

local function intent_of(text)
  local t = string.lower(text)
  for _, intent in ipairs(INTENTS) do
    for _, w in ipairs(intent.words) do
      if string.find(t, w, 1, true) then
        return intent.name
      end
    end
  end
  return "unknown"
end

local function name_of(ctx)
  return ctx.contact.first_name or ctx.contact.username or "there"
end

local function product(ctx)
  return (ctx.campaign.params and ctx.campaign.params.product) or "our product"
end

function M.get_response(ctx, message)
  local state = ctx.state
  state.stage = state.stage or "pitched"
  state.turns = (state.turns or 0) + 1
  local intent = intent_of(message.text)
  state.last_intent = intent

  if intent == "negative" then
    return { text = "Understood, " .. name_of(ctx) .. " — thanks for your time. All the best!", finish = "not_interested" }
  end
  if intent == "book" and state.stage ~= "pitched" then
    local link = ctx.campaign.params and ctx.campaign.params.demo_link
    local tail = link and (" Here is the invite: " .. link) or ""
    return { text = "Great, you're booked! I'll send a calendar invite shortly." .. tail, finish = "booked" }
  end
  if intent == "price" then
    state.stage = "pricing"
    return {
      "Plans start at 29 EUR per seat and month, with a free 14-day trial.",
      "The demo shows which plan fits — would Thursday or Friday work for you?",
    }
  end
  if intent == "positive" or intent == "book" then
    state.stage = "qualified"
    return product(ctx) .. " keeps every customer conversation in one inbox and reminds your team to follow up. Shall I book you a 15-minute demo this week?"
  end
  if intent == "question" then
    return "Good question! The short answer: it saves sales teams about 5 hours a week. Want to see it in a quick demo?"
  end
  if state.turns >= 4 then
    return { text = "I'll pass this on to a colleague who can help you directly.", handoff = true }
  end
  return "Sorry, I didn't quite get that — would a short demo of " .. product(ctx) .. " be interesting for you?"
end

function M.get_follow_up(ctx)
  local stage = ctx.state.stage or "pitched"
  local n = ctx.dialog.follow_ups_sent
  if n == 0 then
    if stage == "pitched" then
      return "Hi " .. name_of(ctx) .. ", just bumping this up — is keeping customer conversations organised a topic for you?"
    end
    return "Hi " .. name_of(ctx) .. ", do you still want to see the demo? I have slots on Thursday and Friday."
  elseif n == 1 then
    return "Last note from me: if the timing is wrong, no worries — just reply whenever it suits you."
  end
  return nil
end

function M.is_dialog_dead(ctx)
  return ctx.dialog.follow_ups_sent >= 2
end

return M
