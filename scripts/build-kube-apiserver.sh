#!/usr/bin/env bash
# Build kube-apiserver 1.20.2 offline from Debian's `kubernetes` source package.
# The vendored modern-go/reflect2 v1.0.1 panics on CRD requests when built with Go >= 1.18, so it is
# replaced by Debian's packaged v1.0.2 before building.
set -euo pipefail
out=$1
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -rqs '^deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    # Derive a deb-src stanza from the first existing deb822 stanza (same URIs/Suites/Signed-By).
    awk 'BEGIN{RS="";FS="\n"} NR==1{for(i=1;i<=NF;i++){ if($i ~ /^Types:/) print "Types: deb-src"; else if($i ~ /^Suites:/) print "Suites: bookworm"; else if($i !~ /^#/) print $i } exit}' \
      /etc/apt/sources.list.d/debian.sources > /etc/apt/sources.list.d/felixpy-deb-src.sources
  elif grep -qs '^deb ' /etc/apt/sources.list; then
    # One-line format (cloud images): mirror the bookworm main line as deb-src.
    grep -m1 -E '^deb .* bookworm( |$)' /etc/apt/sources.list | sed 's/^deb /deb-src /' > /etc/apt/sources.list.d/felixpy-deb-src.list
  fi
  apt-get update -qq
fi
work=$(mktemp -d /var/tmp/kas-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get source --download-only -qq kubernetes >/dev/null
tar xf kubernetes_*.orig.tar.gz
cd kubernetes-*/
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod
# Built with Go 1.19, the vendored OpenAPI validators treat any zero value (e.g. "") as null and reject
# it in typed CRD fields; Calico writes such values. Only a real nil is null.
for f in vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go vendor/github.com/go-openapi/validate/type.go; do
  [ -f "$f" ] && sed -i 's/if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {/if data == nil {/' "$f"
done
export GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off HOME=$work GOCACHE=$work/gocache
mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
make WHAT=cmd/kube-apiserver >/dev/null
install -D -m 0755 _output/bin/kube-apiserver "$out"
"$out" --version
