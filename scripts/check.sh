#!/bin/bash
# Static checks, as CI runs them: ruff over the tree, mypy over the package.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check -q .
# mypy sees the package as it installs: workers/ and supervisor/ are
# dnsrouter.workers and dnsrouter.supervisor (package_dir in setup.cfg), which
# no directory of the checkout spells. A tree of links spells it.
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/dnsrouter"
ln -s "$PWD"/dnsrouter/*.py "$tree/dnsrouter/"
ln -s "$PWD/workers" "$tree/dnsrouter/workers"
ln -s "$PWD/supervisor" "$tree/dnsrouter/supervisor"
root=$PWD
(cd "$tree" && MYPYPATH="$tree" "$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" \
    --cache-dir "$root/.mypy_cache" -p dnsrouter)
