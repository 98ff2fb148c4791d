#!/usr/bin/env bash
# Instructions taskgate executes per forwarded request (docs/performance.md, "Instructions per
# request"): a count that the machine's load does not change, for comparing two builds of the
# forward path. taskgate runs under valgrind's callgrind (user-space instructions only; the
# kernel's share, the same as nginx's, is not counted) in front of the benchmark's upstream;
# wrk sends GET /json on 8 connections for 5 s after a 2 s warm-up.
#
#   apt-get install -y valgrind wrk     # once
#   bench/instructions.sh [TASKGATE_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked --bin taskgate --example bench
taskgate="${1:-$target/release/taskgate}"
work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_port="$(free_port)"
tg_port="$(free_port)"
"$target/release/examples/bench" upstream --listen "127.0.0.1:$up_port" >"$work/upstream.log" 2>&1 &
pids+=($!)
valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
    "$taskgate" serve --listen "127.0.0.1:$tg_port" --upstream "http://127.0.0.1:$up_port" \
    >"$work/taskgate.log" 2>&1 &
vg=$!
pids+=("$vg")
for _ in $(seq 120); do
    curl -sf -o /dev/null "http://127.0.0.1:$tg_port/json" && break
    sleep 0.5
done
url="http://127.0.0.1:$tg_port/json"
wrk -t1 -c8 -d2s "$url" >/dev/null
callgrind_control --zero "$vg" >/dev/null 2>&1
out="$(wrk -t1 -c8 -d5s "$url")"
callgrind_control --dump "$vg" >/dev/null 2>&1
requests="$(awk '/requests in/ {print $1}' <<<"$out")"
# The dump is written asynchronously by the profiled process.
for _ in $(seq 60); do
    ls "$work"/callgrind.out.* >/dev/null 2>&1 && break
    sleep 0.5
done
dump="$(ls "$work"/callgrind.out.* | head -1)"
total="$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')"
echo "$taskgate: $requests requests, $((total / requests)) instructions per request"
