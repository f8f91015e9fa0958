#!/usr/bin/env bash
# End-to-end benchmark: direct veth, kernel VXLAN, flannel-rs with offloads
# off and on, in one run on one namespaced topology with a real etcd.
# Installs what is missing, builds the daemon, runs benches/e2e.py.
# Usage (as root): benches/e2e.sh [--reps N] [--seconds S] [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, TUN)" >&2; exit 1; }
scripts/deps.sh
cargo build --release --quiet --bin flanneld
exec python3 benches/e2e.py --bin "$PWD/target/release/flanneld" "$@"
