#!/usr/bin/env bash
# Installs the Debian packages that flannel-rs's build, demo, tests, fuzzing and
# benchmark need, when any is missing. Safe to run repeatedly.
#
# Each package is keyed on a file the project actually uses, not only on a
# command: etcd-client's build runs protoc on etcd's .proto files, which import
# google/protobuf/descriptor.proto from libprotobuf-dev (only a Recommends of
# protobuf-compiler, so `--no-install-recommends` alone leaves it out).
#
# `scripts/deps.sh --check` lists what is missing and exits 1 if anything is,
# without installing.
set -euo pipefail

# "what:package" — `what` is a command looked up on PATH (and in the sbin
# directories, which a non-login root shell may lack), or an absolute path.
NEEDS=(
  cc:gcc                                            # linker, C parts of -sys crates
  c++:g++                                           # libFuzzer (cargo fuzz)
  /usr/include/stdio.h:libc6-dev
  /etc/ssl/certs/ca-certificates.crt:ca-certificates # cargo and apt over https
  protoc:protobuf-compiler                          # etcd-client's build.rs
  /usr/include/google/protobuf/descriptor.proto:libprotobuf-dev
  /usr/include/google/protobuf/timestamp.proto:libprotobuf-dev
  etcd:etcd-server                                  # tests, demo, bench start their own
  etcdctl:etcd-client
  ip:iproute2                                       # namespaces, veth, routes
  ethtool:ethtool                                   # kernel vxlan node's checksums (tests)
  tc:iproute2                                       # qdisc drop counts (tests)
  ss:iproute2
  nstat:iproute2
  ping:iputils-ping
  iperf3:iperf3
  socat:socat
  openssl:openssl                                   # test certificates
  setpriv:util-linux                                # non-root test
  unshare:util-linux
  flock:util-linux                                  # xtables lock test
  /usr/sbin/iptables-legacy-restore:iptables        # legacy-iptables tests
  sysctl:procps
  ps:procps
  iptables:iptables                                 # --ip-masq tests
  iptables-save:iptables
  iptables-restore:iptables
  nft:nftables
  promtool:prometheus                               # metrics lint (tests/ops.rs)
  python3:python3                                   # benches/e2e.py
  wireguard-go:wireguard-go                         # wireguard reference node (tests, bench)
  wg:wireguard-tools
  /usr/lib/cni/bridge:containernetworking-plugins   # CNI tests
  /usr/lib/cni/host-local:containernetworking-plugins
  /usr/lib/cni/portmap:containernetworking-plugins
)

have() {
  case "$1" in
    /*) [ -e "$1" ] ;;
    *) PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1 ;;
  esac
}

missing=()
for pair in "${NEEDS[@]}"; do
  what=${pair%%:*}; pkg=${pair#*:}
  have "$what" && continue
  case " ${missing[*]-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
  echo "deps: missing $what (package $pkg)" >&2
done

if [ "${1:-}" = --check ]; then
  [ ${#missing[@]} -eq 0 ] && exit 0 || exit 1
fi

if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "deps: run as root to install: ${missing[*]}" >&2; exit 1; }
  echo "deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Prove the install: everything must be there now.
  still=()
  for pair in "${NEEDS[@]}"; do have "${pair%%:*}" || still+=("${pair%%:*}"); done
  [ ${#still[@]} -eq 0 ] || { echo "deps: still missing after install: ${still[*]}" >&2; exit 1; }
fi

# Debian's etcd-server package starts a system etcd on 127.0.0.1:2379; our
# tests start their own and must not meet it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi
