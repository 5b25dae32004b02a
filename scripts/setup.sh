#!/usr/bin/env bash
# Install everything felixpy's agent, lab and tests need on a fresh Debian 12 machine (run as root).
# Idempotent: re-running skips what is already there. The kube-apiserver build (~6 min) is cached.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${FELIXPY_CACHE:-/var/cache/felixpy}
mkdir -p "$cache"

APT_PKGS=(
  python3 python3-venv python3-dev python3-nftables gcc
  iproute2 iputils-ping netcat-openbsd procps kmod util-linux
  nftables iptables ipset conntrack
  etcd-server etcd-client
  containerd runc containernetworking-plugins busybox-static
  golang-go rsync jq golang-github-modern-go-reflect2-dev openssl
)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts etcd/containerd services on install where an init exists; we run our own by PID.
pkill -x etcd 2>/dev/null || true

# Python environment: Debian's interpreter, so the system python3-nftables binding is visible.
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp="$venv/.deps-$(sha1sum "$here/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$here[test]"
  touch "$stamp"
fi

# kube-apiserver from Debian's kubernetes source package (see docs/control-plane.md).
kas="$cache/kube-apiserver"
if [ ! -x "$kas" ]; then
  "$here/scripts/build-kube-apiserver.sh" "$kas"
fi
echo "setup: done (venv $venv, kube-apiserver $kas)"
