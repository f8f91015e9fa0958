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

P=fdemo$$            # namespace prefix, unique per run
HUB=$P-hub
WORK=$(mktemp -d /tmp/flannel-demo.XXXX)
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P-"); do ip netns del "$ns"; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "underlay: a switch namespace ($HUB) and three hosts on 192.168.77.0/24"
ip netns add "$HUB"
ip -n "$HUB" link set lo up
ip -n "$HUB" link add br0 type bridge
ip -n "$HUB" addr add 192.168.77.254/24 dev br0
ip -n "$HUB" link set br0 up
for i in 1 2 3; do
  ns=$P-h$i
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$HUB" link add v$i type veth peer name eth0 netns "$ns"
  ip -n "$HUB" link set v$i master br0 up
  ip -n "$ns" addr add 192.168.77.$i/24 dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via 192.168.77.254
done

step "etcd (Debian's etcd-server) in $HUB on 192.168.77.254:2379"
EP=http://192.168.77.254:2379
ip netns exec "$HUB" etcd --name demo --data-dir "$WORK/etcd" \
  --listen-client-urls $EP --advertise-client-urls $EP \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster demo=http://127.0.0.1:2380 >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
ctl() { ip netns exec "$HUB" env ETCDCTL_API=3 etcdctl --endpoints=$EP "$@"; }
for _ in $(seq 50); do ctl endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
ctl put /coreos.com/network/config '{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}'

step "three flanneld (udp backend), one per host"
for i in 1 2 3; do
  ip netns exec $P-h$i "$BIN" --etcd-endpoints=$EP --subnet-file="$WORK/h$i/subnet.env" \
    >"$WORK/flanneld-h$i.log" 2>&1 &
  PIDS+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 100); do [ -s "$WORK/h$i/subnet.env" ] && break; sleep 0.1; done
  echo "--- h$i subnet.env"; cat "$WORK/h$i/subnet.env"
done

step "leases in etcd"
ctl get --prefix /coreos.com/network/subnets/

addr() { ip -n $P-h$1 -4 -o addr show dev flannel0 | awk '{print $4}' | cut -d/ -f1; }
sleep 1
step "ping across every pair through the tunnels"
for a in 1 2 3; do for b in 1 2 3; do
  [ $a = $b ] && continue
  printf 'h%s -> h%s (%s): ' $a $b "$(addr $b)"
  ip netns exec $P-h$a ping -c 2 -i 0.2 -W 2 -q "$(addr $b)" | grep -o '[0-9]* received'
done; done

step "iperf3 h1 -> h2 through the tunnel (5 s)"
ip netns exec $P-h2 iperf3 -s -1 -D
sleep 0.3
ip netns exec $P-h1 iperf3 -c "$(addr 2)" -t 5 -f m | grep -E 'sender|receiver'

step "iperf3 h1 -> h2 directly on the underlay veth, for comparison (5 s)"
ip netns exec $P-h2 iperf3 -s -1 -D
sleep 0.3
ip netns exec $P-h1 iperf3 -c 192.168.77.2 -t 5 -f m | grep -E 'sender|receiver'

step "flanneld log of h1"
cat "$WORK/flanneld-h1.log"
echo; echo "demo finished; cleaning up"
