#!/bin/sh
# Runs every fuzz target for $1 seconds (default 60), seeded from fuzz/seeds/, and stops at the
# first failure (its input lands in fuzz/artifacts/<target>/). Needs nightly and cargo-fuzz:
#   rustup toolchain install nightly && cargo install cargo-fuzz
set -eu
cd "$(dirname "$0")/.."
seconds="${1:-60}"
for target in sse_framer model_format claims terminal_rule; do
    mkdir -p "fuzz/corpus/$target"
    echo "== $target: ${seconds}s"
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -max_len=65536 -print_final_stats=1
done
