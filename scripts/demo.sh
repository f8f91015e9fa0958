#!/usr/bin/env bash
# A three-host flannel network in network namespaces with a real etcd:
# shows the leases, pings across every pair and runs iperf3 through the
# tunnel (udp backend); then the network moves to the vxlan backend and a
# host running the kernel's own VXLAN, programmed as Go flanneld does, and
# our userspace vxlan hosts reach each other. Everything it creates is
# removed on exit.
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

step "the vxlan backend: the network config now says vxlan; h1 and h2 restart on it"
for pid in "${PIDS[@]:1}"; do kill "$pid"; done
sleep 1
ctl put /coreos.com/network/config '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
ctl del --prefix /coreos.com/network/subnets/ >/dev/null
for i in 1 2; do rm -f "$WORK/h$i/subnet.env"*; start_flanneld $i; done

step "h3 becomes a kernel vxlan node, programmed as Go flanneld's vxlan backend does"
KMAC=0a:58:0a:05:c8:00
ip -n $P-h3 link add flannel.1 type vxlan id 1 local 192.168.77.3 dev eth0 nolearning dstport 8472
ip -n $P-h3 link set flannel.1 address $KMAC mtu 1450 up
ip -n $P-h3 addr add 10.5.200.0/32 dev flannel.1
# (a veth leaves inner checksums to the next namespace; a NIC fills them)
ip netns exec $P-h3 ethtool -K eth0 tx off >/dev/null
ctl put /coreos.com/network/subnets/10.5.200.0-24 \
  '{"PublicIP":"192.168.77.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"'$KMAC'"}}' >/dev/null
for i in 1 2; do
  addr=$(tun_addr $i flannel.1)
  mac=$(ctl get --print-value-only /coreos.com/network/subnets/$addr-24 | python3 -c 'import json,sys; print(json.load(sys.stdin)["BackendData"]["VtepMAC"])')
  ip -n $P-h3 neigh replace $addr lladdr $mac dev flannel.1 nud permanent
  bridge -n $P-h3 fdb replace $mac dev flannel.1 dst 192.168.77.$i self permanent
  ip -n $P-h3 route replace $addr/24 via $addr dev flannel.1 onlink
done
ctl get --prefix /coreos.com/network/subnets/

step "ping kernel vxlan (h3) <-> flannel-rs vxlan (h1, h2), and h1 <-> h2"
for pair in "3 1" "3 2" "1 3" "2 3" "1 2" "2 1"; do
  set -- $pair
  if [ $2 = 3 ]; then dst=10.5.200.0; else dst=$(tun_addr $2 flannel.1); fi
  printf 'h%s -> h%s (%s): ' $1 $2 "$dst"
  ip netns exec $P-h$1 ping -c 2 -i 0.2 -W 2 -q "$dst" | grep -o '[0-9]* received'
done

step "iperf3 kernel vxlan h3 -> flannel-rs vxlan h1 (3 s)"
ip netns exec $P-h1 iperf3 -s -1 -D
sleep 0.3
ip netns exec $P-h3 iperf3 -c "$(tun_addr 1 flannel.1)" -t 3 -f m | grep -E 'sender|receiver'
echo; echo "demo finished; cleaning up"
