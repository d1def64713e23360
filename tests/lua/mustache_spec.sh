#!/usr/bin/env bash
# Runs the Mustache specification's non-optional test files (comments,
# delimiters, interpolation, inverted, partials, sections: 136 cases)
# against scripts/template.lua, plainly and with spintax on.
#
#     git clone https://github.com/mustache/spec /tmp/mustache-spec
#     bash tests/lua/mustache_spec.sh /tmp/mustache-spec/specs
set -euo pipefail
specs=${1:?the specs directory of a mustache/spec checkout}
here=$(cd "$(dirname "$0")/../.." && pwd)
files=()
for name in comments delimiters interpolation inverted partials sections; do
    files+=("$(cat "$specs/$name.json")")
done
bin="$here/target/debug/colloquy"
[ -x "$bin" ] || cargo build --quiet --manifest-path "$here/Cargo.toml"
for mode in plain spin; do
    args=("${files[@]}")
    [ "$mode" = spin ] && args=(spin "${files[@]}")
    echo "$mode: $("$bin" eval "$here/tests/lua/mustache_spec.lua" --config "$here/config.toml" "${args[@]}")"
done
