#!/usr/bin/env bash
# Installs the Debian packages flannel-rs's demo, tests and benchmarks need,
# when any is missing. Safe to run repeatedly.
set -euo pipefail
need=()
for pair in etcd:etcd-server etcdctl:etcd-client protoc:protobuf-compiler ip:iproute2 \
            ping:iputils-ping iperf3:iperf3 socat:socat openssl:openssl setpriv:util-linux \
            iptables:iptables nft:nftables /usr/lib/cni/bridge:containernetworking-plugins; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  if [ "${cmd#/}" != "$cmd" ]; then [ -x "$cmd" ] || need+=("$pkg"); continue; fi
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's etcd-server package starts a system etcd; our tests start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi
