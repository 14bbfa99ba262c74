#!/bin/bash
# Installs what dnsrouter and its tests need on a Debian machine (run as root):
# the real servers the tests start, and a virtual environment in .venv with
# dnsrouter installed editable (the tests and `python -m dnsrouter` run the
# source tree) and its test and static-check dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's own Python, not whatever python3 comes first on PATH: it is
# readable by every user, so the router can drop root to any --user.
PYTHON=/usr/bin/python3
packages=(knot knot-dnsutils knot-module-geoip etcd-server etcd-client dnsperf unbound bind9-dnsutils bind9-utils nsd curl openssl python3 python3-venv python3-dev gcc)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian packages start their services where an init system runs; the
# tests start their own on free ports, so stop these if they came up.
for service in knot etcd unbound; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
        systemctl stop "$service" || true
    fi
done

if [ "$(readlink -f .venv/bin/python 2>/dev/null)" != "$(readlink -f $PYTHON)" ]; then
    rm -rf .venv
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'
