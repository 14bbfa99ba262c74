"""The operator's tools: ``dnsrouterctl`` (``ctl``), the shard rules and the
offline split (``shardmap``, ``shard``, ``label_ranges``), and the feeder
(``feed``, ``dnsrouter-feed``).

They run as processes of their own beside the router and share its control
plane code (the registries, the value parser and matcher), so they live on
the supervisor's side; the supervisor process itself imports none of them.
"""
