"""Support code shared by the tests and by bench/: one home for each concept.

* net          free loopback ports, wait_until (poll with a deadline), one-shot DNS queries
* processes    child processes that die with us, stopped SIGTERM then SIGKILL; our programs
* zones        zone file text: the split a/b zones, numbered host zones
* metrics      the router's HTTP endpoints: /metrics parsed, /routes, /healthz
* fake_backend a scriptable fake DNS server, IPv4 or IPv6
* knot         a real Knot DNS server
* etcd         a real etcd member or cluster, its v2 keys API and v3 helpers (etcdctl, leases, compaction)
* etcd_routing the router and dnsrouterctl pointed at etcd (v2 or v3)
* router       the real router as a subprocess
* load         queries at a steady rate from a few threads

Test modules import from here (and use conftest's fixtures), never from
each other; bench/common.py puts tests/ on sys.path to use the same code.
"""
