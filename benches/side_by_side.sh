#!/usr/bin/env bash
# The throughput benchmark and the Python peer on the same workload, one
# after the other in one run, each printing its JSON line.
#
#     bash benches/side_by_side.sh [DIALOGS] [MESSAGES]
set -euo pipefail
dialogs=${1:-10000}
messages=${2:-100000}
here=$(cd "$(dirname "$0")/.." && pwd)
peer="$here/../shared/bench/python_peer/peer.py"
cargo bench --quiet --bench throughput --manifest-path "$here/Cargo.toml" -- \
    --dialogs "$dialogs" --messages "$messages" | sed 's/^/colloquy: /'
if [ -f "$peer" ]; then
    db=$(mktemp -d)/peer.db
    python3 "$peer" --dialogs "$dialogs" --messages "$messages" --db "$db" | sed 's/^/python peer: /'
else
    echo "python peer: not found at $peer"
fi
