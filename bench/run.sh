#!/usr/bin/env bash
# The performance benchmark (docs/performance.md): release builds of taskgate and the benchmark,
# then one run. Arguments go to the benchmark (--rounds N, --only json,big,sse,holds,idle,lag).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked --bin taskgate --example bench
exec "$target/release/examples/bench" "$@"
