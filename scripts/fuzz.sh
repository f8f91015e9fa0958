#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 15: the CI smoke;
# the long runs in the notes used 600). Installs cargo-fuzz if missing. On a
# stable toolchain libFuzzer's coverage flags need RUSTC_BOOTSTRAP and no
# sanitizer (-s none); the parsers are safe Rust, so panics are what we hunt.
#
# A target passes only when `cargo fuzz run` exits 0, libFuzzer printed its
# `Done N runs` line, and no crash artifact was written: a target that no
# longer builds, or a toolchain that cannot run it, fails the script.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_EACH=${1:-15}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --quiet --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
TARGETS=$(cargo fuzz list)
[ -n "$TARGETS" ] || { echo "fuzz: cargo fuzz list found no targets" >&2; exit 1; }
for t in $TARGETS; do
  rc=0
  cargo fuzz run -s none "$t" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 >"$LOG" 2>&1 || rc=$?
  done_line=$(grep -E '^Done [0-9]+ runs' "$LOG" || true)
  if [ $rc -ne 0 ] || [ -z "$done_line" ] || [ -n "$(ls -A "artifacts/$t" 2>/dev/null)" ]; then
    echo "fuzz target $t FAILED (exit $rc${done_line:+, $done_line}); last output:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
  echo "fuzz $t: $done_line"
done
