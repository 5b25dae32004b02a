#!/usr/bin/env bash
# Install everything felixpy's agent, lab and tests need on a fresh Debian 12 machine (run as root).
# Idempotent and quiet: a re-run skips what is already there. The kube-apiserver build (~6 min) and
# the test images are cached under $FELIXPY_CACHE (default /var/cache/felixpy).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${FELIXPY_CACHE:-/var/cache/felixpy}

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: must run as root" >&2
  exit 1
fi
if ! grep -qs '^VERSION_CODENAME=bookworm$' /etc/os-release; then
  echo "setup: warning: written for Debian 12 (bookworm); continuing anyway" >&2
fi
mkdir -p "$cache"

APT_PKGS=(
  ca-certificates python3 python3-venv python3-dev python3-nftables gcc make
  iproute2 iputils-ping netcat-openbsd procps kmod util-linux
  nftables iptables ipset conntrack
  etcd-server etcd-client
  containerd runc containernetworking-plugins busybox-static
  bird2
  golang-go rsync jq golang-github-modern-go-reflect2-dev openssl
)
# Services these packages start on install and at boot. Tests and the lab run their own instances by
# PID with private sockets and dirs; a system etcd would hold :2379, a system bird :179, and a system
# containerd would be what a bare `ctr` talks to. So they are kept from starting and disabled.
SERVICES=(containerd etcd bird)

is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -qx 'install ok installed'; }
# Run quietly; show the output only if the command fails.
quiet() {
  local log rc=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "setup: failed ($rc): $*" >&2
    cat "$log" >&2
  fi
  rm -f "$log"
  return "$rc"
}

missing=()
for p in "${APT_PKGS[@]}"; do is_installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  # policy-rc.d stops maintainer scripts from starting services (both invoke-rc.d and
  # deb-systemd-invoke honour it). One that already exists (container images ship one) is kept.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  quiet apt-get update -q
  quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  if [ "$own_policy" = 1 ]; then
    rm -f "$policy"
    trap - EXIT
  fi
fi
for svc in "${SERVICES[@]}"; do
  unit="/lib/systemd/system/$svc.service"
  if [ -d /run/systemd/system ] && [ -e "$unit" ]; then
    if systemctl -q is-enabled "$svc.service" 2>/dev/null || systemctl -q is-active "$svc.service"; then
      quiet systemctl disable --now "$svc.service"
    fi
  elif [ -e "$unit" ] && command -v systemctl >/dev/null && [ -n "$(ls /etc/systemd/system/*.wants/"$svc.service" 2>/dev/null)" ]; then
    quiet systemctl disable "$svc.service" # no systemd running: just drop the boot links
  fi
  if [ -x "/etc/init.d/$svc" ] && [ -n "$(ls /etc/rc[2-5].d/S??"$svc" 2>/dev/null)" ]; then
    quiet update-rc.d "$svc" disable
  fi
done

# Python environment: Debian's interpreter with system site-packages, so python3-nftables is visible.
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
if ! grep -qx 'home = /usr/bin' "$venv/pyvenv.cfg" ||
  ! grep -qx 'include-system-site-packages = true' "$venv/pyvenv.cfg"; then
  echo "setup: $venv was not made by '/usr/bin/python3 -m venv --system-site-packages'; move it away and re-run" >&2
  exit 1
fi
stamp="$venv/.deps-$(sha1sum "$here/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
  quiet "$venv/bin/python" -m pip install --upgrade pip
  quiet "$venv/bin/python" -m pip install -e "$here[test]"
  rm -f "$venv"/.deps-*
  touch "$stamp"
fi

# Offline OCI images (pause + busybox) for the containerd test harness; built once per machine.
FELIXPY_CACHE="$cache" quiet "$venv/bin/python" -c \
  'import sys; sys.path.insert(0, sys.argv[1]); from tests.realparts.oci_image import cached_archive; cached_archive()' \
  "$here"

# kube-apiserver from Debian's kubernetes source package (see docs/control-plane.md).
kas="$cache/kube-apiserver-1.20.2-fx2"  # bump the suffix when the build recipe changes
if [ ! -x "$kas" ]; then
  echo "setup: building kube-apiserver (about 6 minutes)"
  quiet "$here/scripts/build-kube-apiserver.sh" "$kas"
fi
echo "setup: done (venv $venv, kube-apiserver $kas)"
