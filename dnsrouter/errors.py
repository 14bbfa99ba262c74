"""Errors of the core. As in dnspython, the docstring is the default message."""
from __future__ import annotations


class DNSRouterError(Exception):
    """dnsrouter error"""

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or (self.__doc__,)))


class ConfigError(DNSRouterError):
    """invalid configuration"""


class ValueParseError(DNSRouterError):
    """registry value does not parse"""


class WireError(DNSRouterError):
    """malformed DNS message"""


class SnapshotError(DNSRouterError):
    """route snapshot does not decode"""
