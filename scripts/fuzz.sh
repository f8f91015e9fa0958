#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 15: the CI smoke;
# the long runs in the notes used 600). Installs cargo-fuzz if missing. On a
# stable toolchain libFuzzer's coverage flags need RUSTC_BOOTSTRAP and no
# sanitizer (-s none); the parsers are safe Rust, so panics are what we hunt.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_EACH=${1:-15}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --quiet --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
for t in wire offload config lease subnet_env cni; do
  cargo fuzz run -s none "$t" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 2>&1 \
    | grep -E '^Done|SUMMARY|panicked|deadly signal' || true
  [ -z "$(ls -A "artifacts/$t" 2>/dev/null)" ] || { echo "fuzz target $t found a crash: fuzz/artifacts/$t" >&2; exit 1; }
done
