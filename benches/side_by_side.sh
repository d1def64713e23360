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
# they show whether a message costs more in a bigger store.
set -euo pipefail
dialogs=${1:-10000}
messages=${2:-100000}
idle=${3:-0}
runs=${RUNS:-1}
here=$(cd "$(dirname "$0")/.." && pwd)
peer="$here/../shared/bench/python_peer/peer.py"
cargo bench --quiet --bench throughput --manifest-path "$here/Cargo.toml" --no-run
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
done
