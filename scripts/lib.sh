# Shared by demo.sh and benches/e2e.sh: a namespaced underlay with a real
# etcd, and cleanup of everything it made. Source it; set P (a unique
# namespace prefix) and WORK (a scratch dir) first.
HUB=$P-hub
EP=http://192.168.77.254:2379
PIDS=()

cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  for ns in $(ip netns list | awk '{print $1}' | grep "^$P-"); do ip netns del "$ns"; done
  rm -rf "$WORK"
}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# underlay N: a bridge in $HUB (192.168.77.254) and hosts $P-h1..hN (192.168.77.i).
underlay() {
  ip netns add "$HUB"
  ip -n "$HUB" link set lo up
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" addr add 192.168.77.254/24 dev br0
  ip -n "$HUB" link set br0 up
  for i in $(seq "$1"); do
    local ns=$P-h$i
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$HUB" link add v$i type veth peer name eth0 netns "$ns"
    ip -n "$HUB" link set v$i master br0 up
    ip -n "$ns" addr add 192.168.77.$i/24 dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via 192.168.77.254
  done
}

ctl() { ip netns exec "$HUB" env ETCDCTL_API=3 etcdctl --endpoints=$EP "$@"; }

# start_etcd: Debian's etcd in $HUB on $EP, with flannel's config written.
start_etcd() {
  ip netns exec "$HUB" etcd --name demo --data-dir "$WORK/etcd" \
    --listen-client-urls $EP --advertise-client-urls $EP \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster demo=http://127.0.0.1:2380 >"$WORK/etcd.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 50); do ctl endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
  ctl put /coreos.com/network/config '{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}' >/dev/null
}

# start_flanneld I [ARGS...]: our flanneld on host I, waiting for its lease.
start_flanneld() {
  local i=$1; shift
  ip netns exec $P-h$i "$BIN" --etcd-endpoints=$EP --subnet-file="$WORK/h$i/subnet.env" "$@" \
    >"$WORK/flanneld-h$i.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do [ -s "$WORK/h$i/subnet.env" ] && return 0; sleep 0.1; done
  echo "flanneld on h$i did not get a lease:" >&2; cat "$WORK/flanneld-h$i.log" >&2; return 1
}

# tun_addr I [DEV]: host I's overlay address (on flannel0, or DEV).
tun_addr() { ip -n $P-h$1 -4 -o addr show dev "${2:-flannel0}" | awk '{print $4}' | cut -d/ -f1; }
