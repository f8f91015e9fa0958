#!/usr/bin/env bash
# End-to-end benchmark: iperf3 between two namespaced hosts over
#   1. the direct veth underlay (the ceiling),
#   2. kernel VXLAN on the same underlay (what flannel users pick when they can),
#   3. flannel-rs's udp backend (our TUN + UDP data path),
# all measured in the same run on the same topology, reported as ratios.
# Usage: sudo benches/e2e.sh [SECONDS] [PARALLEL_STREAMS]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
T=${1:-10}
STREAMS=${2:-1}
scripts/deps.sh
cargo build --release --quiet --bin flanneld
BIN=$PWD/target/release/flanneld
P=fbench$$
WORK=$(mktemp -d /tmp/flannel-bench.XXXX)
. scripts/lib.sh
trap cleanup EXIT INT TERM

underlay 2
# Kernel VXLAN between the two hosts, MTU 1450 (its 50-byte overhead).
for i in 1 2; do
  other=$((3 - i))
  ip -n $P-h$i link add vx0 type vxlan id 42 remote 192.168.77.$other dstport 4789 dev eth0
  ip -n $P-h$i addr add 10.99.0.$i/24 dev vx0
  ip -n $P-h$i link set vx0 up
done
start_etcd
start_flanneld 1
start_flanneld 2
sleep 1

# iperf DST: prints receiver Mbit/s.
run() {
  ip netns exec $P-h2 iperf3 -s -1 -D -p 5299
  sleep 0.3
  ip netns exec $P-h1 iperf3 -c "$1" -p 5299 -t "$T" -P "$STREAMS" -J \
    | python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))'
}
veth=$(run 192.168.77.2)
vxlan=$(run 10.99.0.2)
flannel=$(run "$(tun_addr 2)")
ratio() { python3 -c "print('%.2f' % ($1/$2))"; }
echo
echo "TCP, $STREAMS stream(s), ${T}s each, $(nproc) cores, kernel $(uname -r)"
printf '%-22s %8s Mbit/s\n' "direct veth" "$veth" "kernel VXLAN" "$vxlan" "flannel-rs udp" "$flannel"
echo "flannel-rs / VXLAN = $(ratio "$flannel" "$vxlan")   flannel-rs / veth = $(ratio "$flannel" "$veth")   VXLAN / veth = $(ratio "$vxlan" "$veth")"
