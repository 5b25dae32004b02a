#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) and bring up the one-node lab:
# a local etcd, the felixpy agent, two pods wired through the real CNI executable, their addresses and
# a ping between them. `scripts/lab.sh down` removes everything it made.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
./scripts/setup.sh >/dev/null
exec .venv/bin/felixpy lab "${@:-up}"
