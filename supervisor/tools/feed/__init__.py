"""``dnsrouter-feed``: secondary for a whole zone, primary for each of its shards."""
