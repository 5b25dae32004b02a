#!/usr/bin/env bash
# Build the felixpy image (localhost/felixpy:latest) with podman, without any container registry.
#
# The base image is made locally: debootstrap (minbase) of Debian 12 from the mirror this machine's apt
# sources already use, slimmed like debian:bookworm-slim, imported as $FELIXPY_BASE_IMAGE. The rootfs tar
# is cached under $FELIXPY_CACHE/image/, so a rerun only rebuilds the felixpy layers. The build's RUN steps
# reach the Debian mirror and PyPI through the host network. Run as root; see docs/image.md.
#
# Usage: scripts/build-image.sh [--rebuild-base] [extra `podman build` arguments...]
# Env:   FELIXPY_IMAGE (default localhost/felixpy:latest), FELIXPY_BASE_IMAGE
#        (default localhost/debian:bookworm-slim), FELIXPY_CACHE (default /var/cache/felixpy).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${FELIXPY_CACHE:-/var/cache/felixpy}/image
image=${FELIXPY_IMAGE:-localhost/felixpy:latest}
base=${FELIXPY_BASE_IMAGE:-localhost/debian:bookworm-slim}
suite=bookworm
# Bump when the base recipe below changes: the cached tar and the imported image are keyed on it.
base_recipe=3

rebuild_base=0
if [ "${1:-}" = "--rebuild-base" ]; then
  rebuild_base=1
  shift
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "build-image: must run as root (debootstrap, podman with the system storage)" >&2
  exit 1
fi

# Tools. scripts/setup.sh does not install them (only this script needs them).
need=()
command -v podman >/dev/null || need+=(podman)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  echo "build-image: installing ${need[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi

# The Debian apt sources of this machine (deb822 *.sources and one-line *.list), as deb822 stanzas for
# $suite and its -updates/-security suites. The mirror is never hard-coded here.
host_sources() {
  python3 - "$suite" <<'EOF'
import glob, sys
suite = sys.argv[1]
out = []
def keep(types, uri, suites, comps, signed):
    if "deb" not in types:
        return
    suites = [s for s in suites if s == suite or s.startswith(suite + "-")]
    if uri and suites:
        out.append((uri, suites, comps or ["main"], signed))
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in open(path).read().split("\n\n"):
        f = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            k, v = line.split(":", 1)
            f[k.strip().lower()] = v.split()
        if f.get("enabled", ["yes"])[0] == "no":
            continue
        keep(f.get("types", []), (f.get("uris") or [""])[0], f.get("suites", []), f.get("components", []),
             (f.get("signed-by") or [""])[0])
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        w = line.split("#", 1)[0].split()
        if len(w) >= 3 and w[0] == "deb":
            if w[1].startswith("["):
                while w and not w[1].endswith("]"):
                    w.pop(1)
                w.pop(1)
            keep(["deb"], w[1], [w[2]], w[3:], "")
for uri, suites, comps, signed in out:
    print("Types: deb")
    print(f"URIs: {uri}")
    print(f"Suites: {' '.join(suites)}")
    print(f"Components: {' '.join(comps)}")
    print(f"Signed-By: {signed or '/usr/share/keyrings/debian-archive-keyring.gpg'}")
    print()
EOF
}
sources=$(host_sources)
mirror=$(printf '%s\n' "$sources" | awk -v s="$suite" '/^URIs:/{u=$2} /^Suites:/{for(i=2;i<=NF;i++) if($i==s){print u; exit}}')
if [ -z "$mirror" ]; then
  echo "build-image: no 'deb' source for $suite in /etc/apt/sources.list{,.d/*}: cannot pick a Debian mirror" >&2
  exit 1
fi
key=$(printf '%s\n%s\n%s\n' "$base_recipe" "$suite" "$sources" | sha1sum | cut -c1-12)
tarball="$cache/debian-$suite-minbase-$key.tar"
mkdir -p "$cache"

have_base() {
  podman image exists "$base" &&
    [ "$(podman image inspect --format '{{index .Labels "felixpy.base-key"}}' "$base" 2>/dev/null)" = "$key" ]
}

if [ "$rebuild_base" = 1 ]; then rm -f "$tarball"; fi
if [ "$rebuild_base" = 1 ] || ! have_base; then
  if [ ! -s "$tarball" ]; then
    echo "build-image: debootstrap --variant=minbase $suite from $mirror (a few minutes, cached in $cache)"
    root=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    log="$cache/debootstrap.log"
    if ! debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
      "$suite" "$root" "$mirror" >"$log" 2>&1; then
      tail -20 "$log" >&2
      echo "build-image: debootstrap failed (full log: $log)" >&2
      exit 1
    fi
    # Slim it the way debian:*-slim is: no docs/man/locales now or from later installs, no apt caches or
    # lists, no recommends. /etc/resolv.conf and /etc/hostname are provided by the container runtime.
    rm -f "$root/etc/apt/sources.list"
    printf '%s\n' "$sources" >"$root/etc/apt/sources.list.d/debian.sources"
    cat >"$root/etc/dpkg/dpkg.cfg.d/felixpy-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
    cat >"$root/etc/apt/apt.conf.d/felixpy-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/{man,groff,info,lintian,linda,locale}/* "$root"/var/lib/apt/lists/* \
      "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log \
      "$root"/var/log/apt/* "$root"/etc/resolv.conf "$root"/etc/hostname "$root"/var/cache/debconf/*-old
    tar --numeric-owner --xattrs -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
    trap - EXIT
  fi
  if ! out=$(podman import --change "LABEL felixpy.base-key=$key" --change 'CMD ["bash"]' "$tarball" "$base" 2>&1)
  then
    printf '%s\n' "$out" >&2
    echo "build-image: podman import of $tarball failed" >&2
    exit 1
  fi
  echo "build-image: imported $base from $tarball"
fi

echo "build-image: building $image"
old_id=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
log="$cache/build.log"
# --network host: the RUN steps fetch from the Debian mirror and PyPI (no CNI network is set up for
# builds here). --pull=never: the base exists only in local storage. The host's CA bundle goes in as the
# build secret "host-ca", for pip behind a TLS-intercepting proxy (never stored in the image).
ca_args=()
for ca in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
  if [ -s "$ca" ]; then
    ca_args=(--secret "id=host-ca,src=$ca")
    break
  fi
done
if ! podman build --network host --pull=never --build-arg "BASE=$base" "${ca_args[@]}" -t "$image" "$@" "$here" \
  >"$log" 2>&1; then
  tail -30 "$log" >&2
  echo "build-image: podman build failed (full log: $log)" >&2
  exit 1
fi
# The image this build replaced is now untagged: remove it (only it; the stage caches stay for rebuilds).
new_id=$(podman image inspect --format '{{.Id}}' "$image")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then podman rmi "$old_id" >/dev/null 2>&1 || true; fi
# Same for the build stages of earlier builds: keep the newest (the layer cache of the next build).
podman images --filter label=felixpy.stage=build --filter dangling=true --format '{{.CreatedAt}}|{{.ID}}' |
  sort -r | tail -n +2 | while IFS='|' read -r _ id; do podman rmi "$id" >/dev/null 2>&1 || true; done
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "build-image: $image $((size / 1000000)) MB ($size bytes)"
