#!/usr/bin/env bash
# The test command: installs what is missing (Debian packages), then runs
# every unit and integration test. Integration tests need root: they build
# hosts from network namespaces and start their own etcd.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, TUN)" >&2; exit 1; }
scripts/deps.sh
cargo test --all-targets "$@"
