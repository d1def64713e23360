-- Cases for scripts/template.lua, one per rule of the Mustache specification
-- (interpolation, sections, inverted sections, comments, partials, set
-- delimiters, standalone lines, lambdas). Run by tests/engine.rs through
-- `colloquy eval`: it returns the list of failures.
local template = require("template")

local cases = {
  -- interpolation
  { "plain text", "Hi {Mustache}!\n", {}, "Hi {Mustache}!\n" },
  { "basic", "Hi, {{who}}!", { who = "you" }, "Hi, you!" },
  { "escaping", "{{bad}}", { bad = '& " < >' }, "&amp; &quot; &lt; &gt;" },
  { "triple", "{{{bad}}}", { bad = '& " < >' }, '& " < >' },
  { "ampersand", "{{&bad}}", { bad = '& " < >' }, '& " < >' },
  { "integer", "{{n}} km", { n = 42 }, "42 km" },
  { "decimal", "{{x}}", { x = 2.5 }, "2.5" },
  { "integral float", "{{x}}", { x = 3.0 }, "3" },
  { "miss", "[{{nope}}][{{{nope}}}][{{&nope}}]", {}, "[][][]" },
  { "dotted", "{{a.b}}={{#a}}{{b}}{{/a}}", { a = { b = "x" } }, "x=x" },
  { "dotted deep", "{{a.b.c.d}}", { a = { b = { c = { d = "deep" } } } }, "deep" },
  { "broken chain", "[{{a.b.c}}]", { a = {} }, "[]" },
  { "broken chain resolution", "[{{a.b.c.name}}]", { a = { b = {} }, c = { name = "no" } }, "[]" },
  { "initial resolution", "{{#a}}{{b.c}}{{/a}}", { a = { b = { c = "yes" } }, b = { c = "no" } }, "yes" },
  { "context precedence", "[{{#a}}{{b.c}}{{/a}}]", { a = { b = {} }, b = { c = "no" } }, "[]" },
  { "implicit iterator", "{{.}}", "plain", "plain" },
  { "padding", "|{{ x }}|{{{ x }}}|{{& x }}|", { x = "-" }, "|-|-|-|" },
  { "standalone interpolation keeps whitespace", "  {{x}}\n", { x = "-" }, "  -\n" },
  -- sections
  { "truthy", "[{{#t}}yes{{/t}}]", { t = true }, "[yes]" },
  { "falsey", "[{{#f}}yes{{/f}}]", { f = false }, "[]" },
  { "null is falsey", "[{{#n}}yes{{/n}}]", {}, "[]" },
  { "context", "{{#c}}{{name}}{{/c}}", { c = { name = "joe" } }, "joe" },
  { "parent contexts", "{{#s}}{{a}}{{b}}{{/s}}", { a = "A", s = { b = "B" } }, "AB" },
  { "list", "{{#l}}{{i}},{{/l}}", { l = { { i = 1 }, { i = 2 }, { i = 3 } } }, "1,2,3," },
  { "empty list", "[{{#l}}x{{/l}}]", { l = {} }, "[]" },
  { "implicit iterator list", "{{#l}}({{.}}){{/l}}", { l = { "a", "b" } }, "(a)(b)" },
  { "nested lists", "{{#a}}{{#b}}{{.}}{{/b}};{{/a}}", { a = { { b = { 1, 2 } }, { b = { 3 } } } }, "12;3;" },
  { "doubled", "{{#t}}a{{/t}}{{#t}}b{{/t}}", { t = true }, "ab" },
  { "dotted section", "[{{#a.b}}y{{/a.b}}]", { a = { b = true } }, "[y]" },
  { "dotted broken section", "[{{#a.x.y}}y{{/a.x.y}}]", { a = {} }, "[]" },
  { "surrounding whitespace", " | {{#t}}\t|\t{{/t}} | \n", { t = true }, " | \t|\t | \n" },
  { "internal whitespace", " | {{#t}} {{! c }}\n {{/t}} | \n", { t = true }, " |  \n  | \n" },
  { "indented inline", " {{#t}}YES{{/t}}\n {{#t}}GOOD{{/t}}\n", { t = true }, " YES\n GOOD\n" },
  { "standalone lines", "| a\n{{#t}}\n|\n{{/t}}\n| b\n", { t = true }, "| a\n|\n| b\n" },
  { "indented standalone", "| a\n  {{#t}}\n|\n  {{/t}}\n| b\n", { t = true }, "| a\n|\n| b\n" },
  { "standalone crlf", "|\r\n{{#t}}\r\n{{/t}}\r\n|", { t = true }, "|\r\n|" },
  { "standalone without previous line", "  {{#t}}\n#{{/t}}\n/", { t = true }, "#\n/" },
  { "standalone without newline", "#{{#t}}\n/\n  {{/t}}", { t = true }, "#\n/\n" },
  -- inverted
  { "inverted falsey", "[{{^f}}no{{/f}}]", { f = false }, "[no]" },
  { "inverted truthy", "[{{^t}}no{{/t}}]", { t = true }, "[]" },
  { "inverted empty list", "[{{^l}}none{{/l}}]", { l = {} }, "[none]" },
  { "inverted standalone", "| a\n{{^f}}\n|\n{{/f}}\n| b\n", { f = false }, "| a\n|\n| b\n" },
  -- comments
  { "comment", "12345{{! ignore }}67890", {}, "1234567890" },
  { "multiline comment", "12345{{!\n  ignore\n}}67890", {}, "1234567890" },
  { "standalone comment", "Begin.\n{{! gone }}\nEnd.\n", {}, "Begin.\nEnd.\n" },
  { "indented standalone comment", "Begin.\n  {{! gone }}\nEnd.\n", {}, "Begin.\nEnd.\n" },
  { "standalone comment crlf", "|\r\n{{! x }}\r\n|", {}, "|\r\n|" },
  { "standalone comment without newline", "!\n  {{! x }}", {}, "!\n" },
  { "multiline standalone comment", "Begin.\n{{!\n a\n b\n}}\nEnd.\n", {}, "Begin.\nEnd.\n" },
  { "inline comment", "  12 {{! 34 }}\n", {}, "  12 \n" },
  -- partials
  { "partial", "[{{>p}}]", {}, "[in]", { p = "in" } },
  { "missing partial", "[{{>nope}}]", {}, "[]", {} },
  { "partial context", "[{{>p}}]", { x = "c" }, "[*c*]", { p = "*{{x}}*" } },
  { "recursive partial", "{{>node}}", { v = "X", kids = { { v = "Y", kids = {} } } }, "X<Y<>>", { node = "{{v}}<{{#kids}}{{>node}}{{/kids}}>" } },
  { "partial whitespace", "| {{>p}} |", {}, "| \t|\t |", { p = "\t|\t" } },
  { "partial inline indentation", "  {{x}}  {{> p}}\n", { x = "|" }, "  |  >\n>\n", { p = ">\n>" } },
  { "partial crlf", "|\r\n{{>p}}\r\n|", {}, "|\r\n>|", { p = ">" } },
  { "partial standalone without previous line", "  {{>p}}\n>", {}, "  >\n  >>", { p = ">\n>" } },
  { "partial standalone without newline", ">\n  {{>p}}", {}, ">\n  >\n  >", { p = ">\n>" } },
  { "partial indentation", "\\\n {{>p}}\n/\n", { c = "<\n->" }, "\\\n |\n <\n->\n |\n/\n", { p = "|\n{{{c}}}\n|\n" } },
  { "partial padding", "|{{> p }}|", {}, "|[]|", { p = "[]" } },
  -- set delimiters
  { "delimiters", "{{=<% %>=}}(<%x%>)", { x = "y" }, "(y)" },
  { "special delimiters", "({{=[ ]=}}[x])", { x = "ok" }, "(ok)" },
  { "delimiters persist into sections", "{{=| |=}}|#s||x||/s|", { s = true, x = "!" }, "!" },
  { "delimiters do not reach partials", "{{= | | =}}[ |>p| ]", { v = "yes" }, "[ .yes. ]", { p = ".{{v}}." } },
  { "partial delimiters stay inside", "[ {{>p}} ]{{v}}", { v = "y" }, "[ .y. .y. ]y", { p = ".{{v}}. {{=| |=}}.|v|." } },
  { "delimiter whitespace", "| {{=@ @=}} |", {}, "|  |" },
  { "standalone delimiter", "Begin.\n{{=@ @=}}\nEnd.\n", {}, "Begin.\nEnd.\n" },
  { "standalone delimiter crlf", "|\r\n{{= @ @ =}}\r\n|", {}, "|\r\n|" },
  { "delimiter padding", "|{{= @   @ =}}|", {}, "||" },
  -- lambdas
  { "lambda interpolation", "{{f}}", { f = function() return "hi" end }, "hi" },
  { "lambda expansion", "{{f}}", { f = function() return "{{p}}" end, p = "planet" }, "planet" },
  { "lambda escaping", "<{{f}}{{{f}}}>", { f = function() return ">" end }, "<&gt;>>" },
  { "lambda section", "<{{#f}}x{{/f}}>", { f = function(t) return t == "x" and "yes" or "no" end }, "<yes>" },
  { "lambda section expansion", "<{{#f}}-{{/f}}>", { f = function(t) return t .. "{{p}}" .. t end, p = "P" }, "<-P->" },
}

local failures = {}
for _, c in ipairs(cases) do
  local name, tpl, data, expected, partials = c[1], c[2], c[3], c[4], c[5]
  local ok, got = pcall(template.render, tpl, data, partials)
  if not ok then
    failures[#failures + 1] = name .. ": error " .. tostring(got)
  elseif got ~= expected then
    failures[#failures + 1] = string.format("%s: expected %q, got %q", name, expected, got)
  end
end

-- The escape switch.
local plain = template.render("{{x}}", { x = "a & <b>" }, nil, { escape = false })
if plain ~= "a & <b>" then
  failures[#failures + 1] = "escape = false: got " .. plain
end
-- Errors name the position.
local ok, err = pcall(template.render, "{{#open}} never closed", {})
if ok or not tostring(err):find("never closed") then
  failures[#failures + 1] = "unclosed section: " .. tostring(err)
end

return { count = #cases, failed = #failures, failures = failures }
