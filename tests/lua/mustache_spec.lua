-- The Mustache specification's own test files against scripts/template.lua.
-- Run by tests/lua/mustache_spec.sh, which passes each spec file's JSON
-- text as an argument (the sandbox reads no files). Prints the counts and
-- the names of the failed cases; `spin` as the first argument renders
-- every case with spintax on too (it must change nothing).
local template = require("template")
local json = require("json")

local opts = nil
local first = 1
if arg[1] == "spin" then
  opts = { spin = 1 }
  first = 2
end
local passed, failed, names = 0, 0, {}
for i = first, #arg do
  local spec = json.decode(arg[i])
  for _, t in ipairs(spec.tests) do
    local ok, out = pcall(template.render, t.template, t.data, t.partials, opts)
    if ok and out == t.expected then
      passed = passed + 1
    else
      failed = failed + 1
      names[#names + 1] = t.name
    end
  end
end
return { passed = passed, failed = failed, failed_cases = names }
