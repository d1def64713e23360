#!/usr/bin/env bash
# The console and export at scale: builds a store of DIALOGS dialogs and
# 2 x MESSAGES messages with the throughput benchmark (--data), then times
# every console page three times against the release binary running on it
# (the first view of the campaigns page counts the funnel; later ones show
# the last count), and `colloquy export` of every message with no host.
#
#     bash benches/console.sh [DIALOGS] [MESSAGES]
set -euo pipefail
dialogs=${1:-100000}
messages=${2:-1000000}
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/target/release/colloquy"
dir=$(mktemp -d)
trap 'pkill -TERM -f "$bin run" 2>/dev/null || true; rm -rf "$dir"' EXIT
cargo build --quiet --release --manifest-path "$here/Cargo.toml"
cargo bench --quiet --bench throughput --manifest-path "$here/Cargo.toml" -- \
    --dialogs "$dialogs" --messages "$messages" --data "$dir" | sed 's/^/store built: /'
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf '\n[console]\nlisten = "127.0.0.1:%s"\n' "$port" >> "$dir/config.toml"

cd "$dir"
start=$(date +%s.%N)
"$bin" export --what messages > "$dir/messages.csv"
end=$(date +%s.%N)
echo "export: $(($(wc -l < "$dir/messages.csv") - 1)) messages as CSV in $(echo "$end - $start" | bc) s"

"$bin" run 2> "$dir/host.log" &
for _ in $(seq 100); do
    [ -f "$dir/data/console.token" ] && curl -s -o /dev/null "http://127.0.0.1:$port/login" && break
    sleep 0.1
done
curl -s -c "$dir/jar" -o /dev/null -d "token=$(cat "$dir/data/console.token")" "http://127.0.0.1:$port/login"
for page in "" accounts dialogs "dialogs?page=500" "dialogs?q=$((dialogs / 2))" \
    "dialogs?q=nobody-by-this-name" "dialogs?status=active&account=a7" inbox dnc alerts \
    "dialogs/500" metrics; do
    times=""
    for _ in 1 2 3; do
        times="$times $(curl -s -b "$dir/jar" -o /dev/null -w '%{time_total}' "http://127.0.0.1:$port/$page")"
    done
    echo "page /$page:$times s"
done
