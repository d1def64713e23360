-- Mustache templates, following the Mustache specification: interpolation
-- with HTML escaping, {{{raw}}} and {{& raw}}, dotted names, the implicit
-- iterator {{.}}, sections, inverted sections, comments, partials with
-- indentation, set delimiters, standalone-line rules, and lambdas.
--
--   local template = require("template")
--   template.render("Hi {{contact.first_name}}!", ctx)                 -- escaped
--   template.render(text, view, partials, { escape = false })          -- plain text
--   template.render("{Hi|Hello} {{name}}", view, nil, { spin = ctx })    -- spintax first
--
-- `opts.spin` (a seed, or ctx) expands spintax in the template's own text
-- before Mustache renders it; see `require("spin")` for the rules. Values
-- are never spun.
--
-- `partials` maps partial names to template text. Errors (an unclosed tag or
-- section) are raised with the position in the template.

local M = {}

local find, sub, gsub, match = string.find, string.sub, string.gsub, string.match

local function escape_pattern(s)
  return (gsub(s, "[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"))
end

local HTML = { ["&"] = "&amp;", ['"'] = "&quot;", ["<"] = "&lt;", [">"] = "&gt;" }

local function html_escape(s)
  return (gsub(s, '[&"<>]', HTML))
end

local function is_space(c)
  return c == " " or c == "\t" or c == "\n" or c == "\r" or c == "\v" or c == "\f"
end

local function trim(s)
  return match(s, "^%s*(.-)%s*$")
end

-- Parsing ------------------------------------------------------------------

-- Tokens: { type, value, start, finish, ... }
--   "text"  value = the text
--   "name" / "&"  value = the name
--   "#" / "^"  value = name, children = tokens, inner_start/inner_end = raw text bounds, tags = delimiters
--   ">"  value = name, indentation, tag_index, line_has_non_space
local function parse(template, open, close)
  local tokens, sections, spaces = {}, {}, {}
  local has_tag, non_space, line_has_non_space = false, false, false
  local indentation, tag_index = "", 0
  local pos, len = 1, #template

  local function strip_space()
    if has_tag and not non_space then
      for i = #spaces, 1, -1 do
        tokens[spaces[i]] = false
      end
    end
    spaces = {}
    has_tag, non_space = false, false
  end

  while pos <= len do
    local s, e = find(template, open, pos, true)
    local text_end = s and s - 1 or len
    for i = pos, text_end do
      local c = sub(template, i, i)
      if is_space(c) then
        spaces[#spaces + 1] = #tokens + 1
        indentation = indentation .. c
      else
        non_space, line_has_non_space = true, true
        indentation = indentation .. " "
      end
      tokens[#tokens + 1] = { "text", c, i, i + 1 }
      if c == "\n" then
        strip_space()
        indentation, tag_index, line_has_non_space = "", 0, false
      end
    end
    if not s then
      break
    end
    has_tag = true
    local start = s
    pos = e + 1
    local kind = sub(template, pos, pos)
    if find("#^/>{&=!", kind, 1, true) and kind ~= "" then
      pos = pos + 1
    else
      kind = "name"
    end
    local value, tag_end
    if kind == "=" then
      local cs = find(template, "=" .. close, pos, true)
      if not cs then
        error("template: unclosed set-delimiter tag at position " .. start, 0)
      end
      value = sub(template, pos, cs - 1)
      tag_end = cs + 1 + #close - 1
    elseif kind == "{" then
      local cs = find(template, "}" .. close, pos, true)
      if not cs then
        error("template: unclosed {{{ tag at position " .. start, 0)
      end
      value = sub(template, pos, cs - 1)
      tag_end = cs + #close
      kind = "&"
    else
      local cs = find(template, close, pos, true)
      if not cs then
        error("template: unclosed tag at position " .. start, 0)
      end
      value = sub(template, pos, cs - 1)
      tag_end = cs + #close - 1
    end
    pos = tag_end + 1
    value = trim(value)
    local token
    if kind == ">" then
      token = { ">", value, start, pos, indentation = indentation, tag_index = tag_index, line_has_non_space = line_has_non_space }
    else
      token = { kind, value, start, pos }
    end
    tag_index = tag_index + 1
    tokens[#tokens + 1] = token
    if kind == "#" or kind == "^" then
      token.tags = { open, close }
      sections[#sections + 1] = token
    elseif kind == "/" then
      local open_section = table.remove(sections)
      if not open_section then
        error('template: section "' .. value .. '" closed at position ' .. start .. " was never opened", 0)
      end
      if open_section[2] ~= value then
        error('template: section "' .. open_section[2] .. '" is closed by "' .. value .. '" at position ' .. start, 0)
      end
    elseif kind == "name" or kind == "&" then
      non_space = true
    elseif kind == "=" then
      local o, c = match(value, "^(%S+)%s+(%S+)$")
      if not o then
        error("template: bad set-delimiter tag at position " .. start, 0)
      end
      open, close = o, c
    end
  end
  strip_space()
  local unclosed = table.remove(sections)
  if unclosed then
    error('template: section "' .. unclosed[2] .. '" opened at position ' .. unclosed[3] .. " is never closed", 0)
  end

  -- Squash adjacent text and nest sections.
  local nested, collector, stack = {}, nil, {}
  collector = nested
  local last_text
  for _, t in ipairs(tokens) do
    if t then
      if t[1] == "text" then
        if last_text then
          last_text[2] = last_text[2] .. t[2]
          last_text[4] = t[4]
        else
          last_text = { "text", t[2], t[3], t[4] }
          collector[#collector + 1] = last_text
        end
      else
        last_text = nil
        if t[1] == "#" or t[1] == "^" then
          collector[#collector + 1] = t
          stack[#stack + 1] = t
          t.children = {}
          collector = t.children
        elseif t[1] == "/" then
          local section = table.remove(stack)
          section.inner_end = t[3]
          collector = #stack > 0 and stack[#stack].children or nested
        else
          collector[#collector + 1] = t
        end
      end
    end
  end
  return nested
end

-- Rendering ----------------------------------------------------------------

local function lookup(stack, name)
  if name == "." then
    return stack[#stack]
  end
  local first, rest = match(name, "^([^%.]+)%.?(.*)$")
  if not first then
    return nil
  end
  local value
  for i = #stack, 1, -1 do
    local ctx = stack[i]
    if type(ctx) == "table" and ctx[first] ~= nil then
      value = ctx[first]
      break
    end
  end
  if rest ~= "" then
    for part in string.gmatch(rest, "[^%.]+") do
      if type(value) ~= "table" then
        return nil
      end
      value = value[part]
    end
  end
  return value
end

local function is_list(v)
  return type(v) == "table" and (rawget(v, 1) ~= nil or next(v) == nil)
end

local function to_text(v)
  if v == nil then
    return ""
  end
  if math.type(v) == "float" and v == math.floor(v) and math.abs(v) < 2 ^ 53 then
    return string.format("%d", v)
  end
  return tostring(v)
end

local render_tokens

local function render_string(text, stack, partials, opts, open, close)
  return render_tokens(parse(text, open or "{{", close or "}}"), stack, partials, opts, text)
end

render_tokens = function(tokens, stack, partials, opts, source)
  local out = {}
  for _, t in ipairs(tokens) do
    local kind = t[1]
    if kind == "text" then
      out[#out + 1] = t[2]
    elseif kind == "name" or kind == "&" then
      local v = lookup(stack, t[2])
      if type(v) == "function" then
        v = render_string(to_text(v()), stack, partials, opts)
      end
      local s = to_text(v)
      if kind == "name" and opts.escape ~= false then
        s = html_escape(s)
      end
      out[#out + 1] = s
    elseif kind == "#" then
      local v = lookup(stack, t[2])
      if type(v) == "function" then
        local raw = sub(source, t[4], t.inner_end - 1)
        out[#out + 1] = render_string(to_text(v(raw)), stack, partials, opts, t.tags[1], t.tags[2])
      elseif is_list(v) then
        for _, item in ipairs(v) do
          stack[#stack + 1] = item
          out[#out + 1] = render_tokens(t.children, stack, partials, opts, source)
          stack[#stack] = nil
        end
      elseif v ~= nil and v ~= false then
        stack[#stack + 1] = v
        out[#out + 1] = render_tokens(t.children, stack, partials, opts, source)
        stack[#stack] = nil
      end
    elseif kind == "^" then
      local v = lookup(stack, t[2])
      if v == nil or v == false or (is_list(v) and #v == 0) then
        out[#out + 1] = render_tokens(t.children, stack, partials, opts, source)
      end
    elseif kind == ">" then
      local partial = partials and partials[t[2]]
      if type(partial) == "string" then
        if t.tag_index == 0 and t.indentation ~= "" then
          local indent = gsub(t.indentation, "[^ \t]", "")
          local lines, i = {}, 0
          for line in (partial .. "\n"):gmatch("(.-)\n") do
            i = i + 1
            if line ~= "" and (i > 1 or not t.line_has_non_space) then
              line = indent .. line
            end
            lines[#lines + 1] = line
          end
          partial = table.concat(lines, "\n")
        end
        out[#out + 1] = render_string(partial, stack, partials, opts)
      end
    end
  end
  return table.concat(out)
end

--- Renders `text` with `view`. `partials` maps names to template text;
--- `opts.escape = false` turns HTML escaping off; `opts.spin` (a seed or
--- ctx) expands spintax first.
function M.render(text, view, partials, opts)
  if type(text) ~= "string" then
    error("template.render: the template must be a string, not " .. type(text), 2)
  end
  opts = opts or {}
  if opts.spin ~= nil then
    text = require("spin").render(text, opts.spin)
  end
  return render_string(text, { view }, partials or {}, opts)
end

M.escape = html_escape

return M
