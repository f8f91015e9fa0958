#!/usr/bin/env bash
# A three-host flannel network in network namespaces with a real etcd:
# shows the leases, pings across every pair and runs iperf3 through the
# tunnel. Everything it creates is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (network namespaces, TUN)" >&2; exit 1; }
scripts/deps.sh
cargo build --release --quiet --bin flanneld
BIN=$PWD/target/release/flanneld
P=fdemo$$
WORK=$(mktemp -d /tmp/flannel-demo.XXXX)
. scripts/lib.sh
trap cleanup EXIT INT TERM

step "underlay: a switch namespace ($HUB) and three hosts on 192.168.77.0/24"
underlay 3
step "etcd (Debian's etcd-server) in $HUB on $EP, network config written"
start_etcd
ctl get /coreos.com/network/config --print-value-only

step "three flanneld (udp backend), one per host"
for i in 1 2 3; do
  start_flanneld $i
  echo "--- h$i subnet.env"; cat "$WORK/h$i/subnet.env"
done

step "leases in etcd"
ctl get --prefix /coreos.com/network/subnets/

step "ping across every pair through the tunnels"
for a in 1 2 3; do for b in 1 2 3; do
  [ $a = $b ] && continue
  printf 'h%s -> h%s (%s): ' $a $b "$(tun_addr $b)"
  ip netns exec $P-h$a ping -c 2 -i 0.2 -W 2 -q "$(tun_addr $b)" | grep -o '[0-9]* received'
done; done

step "iperf3 h1 -> h2 through the tunnel (5 s)"
ip netns exec $P-h2 iperf3 -s -1 -D
sleep 0.3
ip netns exec $P-h1 iperf3 -c "$(tun_addr 2)" -t 5 -f m | grep -E 'sender|receiver'

step "iperf3 h1 -> h2 directly on the underlay veth, for comparison (5 s)"
ip netns exec $P-h2 iperf3 -s -1 -D
sleep 0.3
ip netns exec $P-h1 iperf3 -c 192.168.77.2 -t 5 -f m | grep -E 'sender|receiver'

step "flanneld log of h1"
cat "$WORK/flanneld-h1.log"
echo; echo "demo finished; cleaning up"
