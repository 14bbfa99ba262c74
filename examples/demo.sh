#!/bin/bash
# A working example: one Knot DNS backend serving shard.example.com on
# 127.0.0.1:5301, a file registry with one route to it, and dnsrouter on
# 127.0.0.1:5300 in the foreground (Ctrl-C stops everything). Try:
#   kdig @127.0.0.1 -p 5300 www.shard.example.com     -> answered by Knot
#   kdig @127.0.0.1 -p 5300 www.example.org           -> SERVFAIL (no route)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/dnsrouter-demo.XXXXXX)
mkdir -p "$work/routes" "$work/knot"

cat > "$work/knot/shard.zone" <<ZONE
\$ORIGIN shard.example.com.
\$TTL 300
@    SOA ns hostmaster 1 3600 600 86400 300
@    NS  ns
ns   A   127.0.0.1
www  A   192.0.2.80
*    A   192.0.2.99
ZONE
cat > "$work/knot/knot.conf" <<CONF
server:
    listen: 127.0.0.1@5301
    rundir: $work/knot
    pidfile: $work/knot/knot.pid
    identity: demo-backend
database:
    storage: $work/knot
control:
    listen: $work/knot/knot.sock
template:
  - id: default
    storage: $work/knot
    zonefile-sync: -1
    journal-content: none
zone:
  - domain: shard.example.com.
    file: shard.zone
CONF
knotd -c "$work/knot/knot.conf" &
knot_pid=$!
trap 'kill $knot_pid 2>/dev/null; rm -rf "$work"' EXIT

# One route: every name under shard.example.com goes to the Knot backend.
echo '127.0.0.1:5301,\.shard\.example\.com\.$' > "$work/routes/shard"
.venv/bin/dnsrouter --listen 127.0.0.1:5300 --routes-dir "$work/routes" --workers 2
