#!/usr/bin/env bash
# The throughput benchmark and the Python peer on the same workload, one
# after the other, each printing its JSON line; RUNS pairs of them,
# alternating, since the machine's speed may drift between runs.
#
#     bash benches/side_by_side.sh [DIALOGS] [MESSAGES] [IDLE]
#     RUNS=5 bash benches/side_by_side.sh
#     bash benches/side_by_side.sh 1000000 1000000        # a million dialogs, all messaged
#     bash benches/side_by_side.sh 10000 100000 1000000   # 10,000 messaged in a store
#                                                         # already holding a million more
# IDLE dialogs are colloquy's only (the peer's workload has no such option):
# they show whether a message costs more in a bigger store. A table of the
# pairs (messages/s, CPU a message during the run and until the host
# stopped, times the peer) closes the output.
set -euo pipefail
dialogs=${1:-10000}
messages=${2:-100000}
idle=${3:-0}
runs=${RUNS:-1}
here=$(cd "$(dirname "$0")/.." && pwd)
peer="$here/../shared/bench/python_peer/peer.py"
cargo bench --quiet --bench throughput --manifest-path "$here/Cargo.toml" --no-run
lines=$(mktemp)
trap 'rm -f "$lines"' EXIT
for _ in $(seq "$runs"); do
    cargo bench --quiet --bench throughput --manifest-path "$here/Cargo.toml" -- \
        --dialogs "$dialogs" --messages "$messages" --idle "$idle" | sed 's/^/colloquy: /'
    if [ -f "$peer" ]; then
        db=$(mktemp -d)/peer.db
        python3 "$peer" --dialogs "$dialogs" --messages "$messages" --db "$db" | sed 's/^/python peer: /'
        # Its SQLite files per message and reply, beside colloquy's store_bytes_per_message.
        echo "python peer: db_bytes_per_message $(($(cat "$db"* | wc -c) / (2 * messages)))"
        rm -rf "$(dirname "$db")"
    else
        echo "python peer: not found at $peer"
    fi
done | tee "$lines"
# One row a pair: what the sitting's figures say side by side.
python3 - "$lines" <<'SUMMARY'
import json, sys
pairs, pair = [], None
for line in open(sys.argv[1]):
    who, _, rest = line.partition(": ")
    if who == "colloquy" and rest.startswith("{"):
        pair = {"ours": json.loads(rest)}
        pairs.append(pair)
    elif who == "python peer" and rest.startswith("{") and pair:
        pair["peer"] = json.loads(rest)
print("\n| run | colloquy msg/s (CPU µs a message) | CPU µs a message to stopped | peer msg/s | times the peer |")
print("|---|---|---|---|---|")
for i, p in enumerate(pairs, 1):
    ours, peer = p["ours"], p.get("peer")
    times = f"{ours['msgs_per_s'] / peer['msgs_per_s']:.2f}" if peer else "-"
    theirs = f"{peer['msgs_per_s']:,.0f}" if peer else "-"
    print(f"| {i} | {ours['msgs_per_s']:,.0f} ({ours['cpu_us_per_msg']}) | {ours['cpu_us_per_msg_to_stopped']} | {theirs} | {times} |")
SUMMARY
