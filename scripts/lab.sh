#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) and bring up the multi-node lab: node network namespaces on a
# bridge, a local etcd (or kube-apiserver with --datastore kubernetes), an agent (+ ExaBGP) per node, pods
# made through the real CNI executable; it prints pod IPs per node, BGP peers and a ping matrix.
#   scripts/lab.sh                      # = up: 3 nodes, BGP, etcd, 2 pods per node
#   scripts/lab.sh up --mode vxlan-crosssubnet --datastore kubernetes --rr ...   (see `felixpy lab up --help`)
#   scripts/lab.sh status | down        # down removes everything up made
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
./scripts/setup.sh >/dev/null
exec .venv/bin/felixpy lab "${@:-up}"
