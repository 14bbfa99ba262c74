#!/bin/bash
# Installs what dnsrouter and its tests need on a Debian machine (run as root):
# the real servers the tests start, and a virtual environment in .venv with
# dnsrouter and its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(knot knot-dnsutils etcd-server dnsperf curl openssl)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian packages start their services where an init system runs; the
# tests start their own on free ports, so stop these if they came up.
for service in knot etcd; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
        systemctl stop "$service" || true
    fi
done

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q '.[test]'
