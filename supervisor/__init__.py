"""The supervisor: registry, health, metrics, signals and the workers' lifecycle.

The operator's tools (``dnsrouterctl``, the shard tool, ``dnsrouter-feed``)
are in ``tools``.
"""
