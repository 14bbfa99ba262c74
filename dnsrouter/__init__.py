"""dnsrouter: routes DNS queries to authoritative shards by regexp."""

__version__ = "0.1.0"
