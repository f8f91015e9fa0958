#!/usr/bin/env bash
# Fresh-install check: runs the README's commands in a brand-new minimal Debian
# root, so that a package the project forgot to install shows up as a failure
# instead of hiding behind what this machine already has.
#
#   scripts/fresh-install.sh [COMMAND...]     (as root; default: scripts/demo.sh)
#
# The root is `debootstrap --variant=minbase` of the host's own release from the
# host's Debian mirror, plus only what a new machine here has besides Rust:
# gcc libc6-dev make git python3 iproute2 ca-certificates. It borrows the host's
# Rust toolchain (~/.cargo and ~/.rustup bind-mounted), gets a `git clone` of
# this repository's HEAD (or of $FRESH_REV), and runs each COMMAND from the
# clone as root in a chroot with /proc, /sys, /dev and a tmpfs /run, `/` being a
# mount point (`ip netns exec` needs that). Everything happens in a private
# mount namespace, so the mounts vanish with it; processes left in the root are
# killed and the root is deleted on exit, also on failure.
#
# The base root is built once and cached as a tarball in $FRESH_CACHE
# (default /var/cache/flannel-rs-fresh, outside the clone); downloaded .debs
# are cached there too. Every run unpacks a new copy, so nothing installed by
# one run is seen by the next.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot, namespaces)" >&2; exit 1; }
[ $# -gt 0 ] || set -- scripts/demo.sh

NEW_MACHINE_PKGS="gcc libc6-dev make git python3 iproute2 ca-certificates"
CACHE=${FRESH_CACHE:-/var/cache/flannel-rs-fresh}
REV=$(git -C "$REPO" rev-parse --verify "${FRESH_REV:-HEAD}^{commit}")
CARGO_DIR=${CARGO_HOME:-$HOME/.cargo}
RUSTUP_DIR=${RUSTUP_HOME:-$HOME/.rustup}
[ -x "$CARGO_DIR/bin/cargo" ] || { echo "no Rust toolchain at $CARGO_DIR" >&2; exit 1; }
[ -d "$RUSTUP_DIR/toolchains" ] || { echo "no rustup toolchains at $RUSTUP_DIR" >&2; exit 1; }

. /etc/os-release
CODENAME=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
ARCH=$(dpkg --print-architecture)

# The host's Debian mirror: the first deb822 URIs or one-line `deb` source
# that serves this release (not -security, not -updates).
host_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk -v c="$CODENAME" '
      /^[Uu][Rr][Ii][Ss]:/ { u=$2 } /^[Ss]uites:/ { for (i=2;i<=NF;i++) if ($i==c) s=1 }
      /^$/ { if (u && s && !done) { print u; done=1 } u=""; s=0 }
      END { if (u && s && !done) print u }' "$f"
  done
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk -v c="$CODENAME" '$1=="deb" { for (i=2;i<=NF;i++) if ($i==c) { print (($2 ~ /^\[/) ? $3 : $2); exit } }'
}
MIRROR=${FRESH_MIRROR:-$(host_mirror | head -n1 || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

command -v debootstrap >/dev/null 2>&1 || {
  echo "fresh-install: installing debootstrap on the host (the check's own tool)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}

START=$SECONDS
mkdir -p "$CACHE/archives/partial"
KEY=$(printf '%s %s %s %s' "$CODENAME" "$ARCH" "$MIRROR" "$NEW_MACHINE_PKGS" | sha256sum | cut -c1-12)
BASE=$CACHE/base-$CODENAME-$ARCH-$KEY.tar

WORK=$(mktemp -d /var/tmp/flannel-fresh.XXXXXX)
ROOT=$WORK/root
kill_in_root() {
  local p r
  for p in /proc/[0-9]*; do
    r=$(readlink "$p/root" 2>/dev/null) || continue
    case "$r" in "$ROOT"|"$ROOT"/*) kill -9 "${p#/proc/}" 2>/dev/null || true ;; esac
  done
}
cleanup() {
  set +e
  kill_in_root
  # The mounts lived in the private namespace; refuse to delete through any
  # that leaked into ours.
  if findmnt -rn -o TARGET | grep -q "^$WORK"; then
    echo "fresh-install: mounts left under $WORK, not deleting it" >&2
  else
    rm -rf --one-file-system "$WORK"
  fi
}
trap cleanup EXIT INT TERM

if [ ! -s "$BASE" ]; then
  echo "fresh-install: building the base root ($CODENAME/$ARCH minbase from $MIRROR) into $BASE" >&2
  B=$WORK/base
  debootstrap --variant=minbase --arch="$ARCH" "$CODENAME" "$B" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }
  cp /etc/resolv.conf "$B/etc/resolv.conf"
  chroot "$B" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $NEW_MACHINE_PKGS >/dev/null && apt-get clean"
  rm -rf "$B/var/lib/apt/lists/"*
  tar -C "$B" -cf "$BASE.tmp" . && mv "$BASE.tmp" "$BASE"
  rm -rf --one-file-system "$B"
fi

mkdir -p "$ROOT"
tar -C "$ROOT" -xf "$BASE"
# The machine's network settings, not packages: its resolver, and the CA
# bundle it trusts (where the registries are reached through a TLS proxy, its
# CA is in there; apt may rebuild /etc/ssl/certs, so the tools get a copy).
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
HOST_CA=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
[ -r "$HOST_CA" ] && cp "$HOST_CA" "$ROOT/etc/ssl/host-ca-bundle.crt"
mkdir -p "$ROOT/root/.cargo" "$ROOT/root/.rustup" "$ROOT/root/src"
git clone -q --no-hardlinks "$REPO" "$ROOT/root/src/flannel-rs"
git -C "$ROOT/root/src/flannel-rs" checkout -q --detach "$REV"
echo "fresh-install: base ready in $((SECONDS - START)) s; commit $(git -C "$REPO" log -1 --format='%h %s' "$REV")" >&2

# The commands, quoted for the inner shell.
CMDS=""
for c in "$@"; do CMDS+="echo \"fresh-install: running $c\" >&2; $c; "; done

# Everything below runs in a private mount namespace: its mounts disappear
# when it exits, whatever happens.
CA_ENV=""
if [ -s "$ROOT/etc/ssl/host-ca-bundle.crt" ]; then
  for v in SSL_CERT_FILE CARGO_HTTP_CAINFO GIT_SSL_CAINFO CURL_CA_BUNDLE; do
    CA_ENV+=" $v=/etc/ssl/host-ca-bundle.crt"
  done
fi
unshare --mount --propagation private -- env ROOT="$ROOT" CARGO_DIR="$CARGO_DIR" CA_ENV="$CA_ENV" \
  RUSTUP_DIR="$RUSTUP_DIR" CACHE="$CACHE" CMDS="$CMDS" bash -euo pipefail -c '
  mount --bind "$ROOT" "$ROOT"                 # "/" must be a mount point for ip netns
  mount -t proc proc "$ROOT/proc"
  mount -t sysfs sysfs "$ROOT/sys"
  mount --rbind /dev "$ROOT/dev"
  mount -t tmpfs -o mode=0755 tmpfs "$ROOT/run"
  mount --bind "$CARGO_DIR" "$ROOT/root/.cargo"
  mount --bind "$RUSTUP_DIR" "$ROOT/root/.rustup"
  mount --bind "$CACHE/archives" "$ROOT/var/cache/apt/archives"
  exec chroot "$ROOT" env -i HOME=/root USER=root TERM=dumb LANG=C.UTF-8 \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_TERM_COLOR=never CARGO_HOME=/root/.cargo RUSTUP_HOME=/root/.rustup \
    $CA_ENV \
    bash -euo pipefail -c "cd /root/src/flannel-rs; $CMDS"
' && rc=0 || rc=$?

if [ $rc = 0 ]; then
  echo "fresh-install: PASSED in $((SECONDS - START)) s ($*)" >&2
else
  echo "fresh-install: FAILED (exit $rc) after $((SECONDS - START)) s ($*)" >&2
fi
exit $rc
