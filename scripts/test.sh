#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) and run the whole check: lint, types, tests.
# Extra arguments go to pytest (e.g. `scripts/test.sh tests/unit -x`).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
./scripts/setup.sh
py=.venv/bin/python
echo "== ruff"; .venv/bin/ruff check felixpy bgp cni_plugin tests bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
set +e
"$py" -m pytest -p no:cacheprovider -rs "${@:-tests}"
rc=$?
set -e
# pytest's "no tests collected" (5) is a failure here: a run that tests nothing must not pass.
exit $rc
