"""``dnsrouter-feed``'s settings, declared once as the router's are.

``[feed]`` names the zone, its primary and where the feeder serves its
shards; one ``[shard K]`` section per shard gives the key its secondaries
sign with and their addresses; ``[registry]``, ``[metrics]`` and ``[log]``
are the router's own declarations (``same_as``), so the two programs cannot
disagree on what a key means.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import os
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.tsig

from dnsrouter import config as configuration
from dnsrouter.address import Address, parse_address
from dnsrouter.errors import ConfigError
from dnsrouter.settings import declare, positive_float, positive_int, same_as, settings_of


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key written as ``kdig -y`` takes it: ``ALGORITHM:NAME:BASE64``."""

    algorithm: dns.name.Name
    name: dns.name.Name
    secret: bytes

    def key(self) -> dns.tsig.Key:
        return dns.tsig.Key(self.name, self.secret, self.algorithm)

    def __str__(self) -> str:
        algorithm = self.algorithm.to_text(omit_final_dot=True)
        return f"{algorithm}:{self.name.to_text(omit_final_dot=True)}:********"


_ALGORITHMS = {dns.tsig.HMAC_SHA256, dns.tsig.HMAC_SHA384, dns.tsig.HMAC_SHA512, dns.tsig.HMAC_SHA224,
               dns.tsig.HMAC_SHA1, dns.tsig.HMAC_MD5}


def parse_tsig(text: str) -> TsigKey:
    parts = text.strip().split(":")
    if len(parts) != 3:
        raise ValueError("not ALGORITHM:NAME:BASE64SECRET (as kdig -y takes it)")
    try:
        algorithm = dns.name.from_text(parts[0].lower())
        name = dns.name.from_text(parts[1])
    except dns.exception.DNSException as e:
        raise ValueError(f"{text.strip()!r}: {e}") from None
    if algorithm not in _ALGORITHMS:
        names = ", ".join(sorted(a.to_text(omit_final_dot=True) for a in _ALGORITHMS))
        raise ValueError(f"unknown TSIG algorithm {parts[0]!r} (one of {names})")
    try:
        secret = base64.b64decode(parts[2], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the secret is not base64") from None
    if not secret:
        raise ValueError("the secret is empty")
    return TsigKey(algorithm, name, secret)


def _optional_tsig(text: str) -> TsigKey | None:
    return parse_tsig(text) if text.strip() else None


def _shard_tsig(text: str) -> TsigKey:
    if not text.strip():
        raise ValueError("required: the key the shard's secondaries sign with, ALGORITHM:NAME:BASE64")
    return parse_tsig(text)


def _zone(text: str) -> dns.name.Name:
    if not text.strip():
        raise ValueError("required: the zone's name, e.g. example.com.")
    try:
        return dns.name.from_text(text.strip())
    except dns.exception.DNSException as e:
        raise ValueError(f"{text.strip()!r}: {e}") from None


def _address(text: str) -> Address:
    if not text.strip():
        raise ValueError("required: ip:port")
    return parse_address(text)


def _state(text: str) -> str:
    path = text.strip()
    if not path:
        raise ValueError("required: a directory for the zone and its journal")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory")
    return path


def _backends(text: str) -> tuple[Address, ...]:
    backends = tuple(parse_address(part) for part in text.replace(",", " ").split())
    if not backends:
        raise ValueError("required: the addresses of the shard's secondaries, ip:port[, ip:port...]")
    return backends


@dataclass(frozen=True)
class ShardConfig:
    """One ``[shard K]`` section."""

    shard_tsig: TsigKey = declare(
        "shard", "tsig", "", _shard_tsig,
        "the TSIG key the shard's secondaries sign their transfers with (ALGORITHM:NAME:BASE64, "
        "as kdig -y takes it); a transfer signed with it gets this shard")
    shard_backends: tuple[Address, ...] = declare(
        "shard", "backends", "", _backends,
        "the shard's secondaries, ip:port[, ip:port...]: NOTIFY goes to each, and each is "
        "registered as a route for the shard's names")


@dataclass(frozen=True)
class FeedConfig:
    feed_zone: dns.name.Name = declare("feed", "zone", "", _zone, "the zone to shard, e.g. example.com.")
    feed_primary: Address = declare("feed", "primary", "", _address,
                                    "the zone's primary, ip:port: transfers come from it, NOTIFY only from it")
    feed_primary_tsig: TsigKey | None = declare(
        "feed", "primary_tsig", "", _optional_tsig,
        "the TSIG key for transfers from the primary, ALGORITHM:NAME:BASE64 (empty: none)")
    feed_listen: Address = declare("feed", "listen", "", _address,
                                   "ip:port where the shards' secondaries transfer from and the primary notifies")
    feed_state: str = declare("feed", "state", "", _state,
                              "the directory of the zone, its shard map and journal (made if missing)")
    feed_journal_serials: int = declare(
        "feed", "journal_serials", "1000", positive_int,
        "serials of changes kept for IXFR out; a secondary further behind gets an AXFR")
    feed_timeout: float = declare(
        "feed", "timeout", "30", positive_float,
        "seconds a transfer from the primary may stay silent before it is abandoned and retried")
    registry_etcd: tuple[str, ...] = same_as("registry_etcd")
    registry_etcd_api: str = same_as("registry_etcd_api")
    registry_prefix: str = same_as("registry_prefix")
    registry_routes_dir: str | None = same_as("registry_routes_dir")
    registry_username: str | None = same_as("registry_username")
    registry_password: str | None = same_as("registry_password")
    registry_ca_cert: str | None = same_as("registry_ca_cert")
    registry_cert: str | None = same_as("registry_cert")
    registry_key: str | None = same_as("registry_key")
    metrics_listen: Address | None = same_as("metrics_listen")
    log_level: str = same_as("log_level")
    log_target: str = same_as("log_target")
    shards: tuple[ShardConfig, ...] = ()
    config_file: str | None = None


FEED_SETTINGS = settings_of(FeedConfig)
SHARD_SETTINGS = settings_of(ShardConfig)


def build_parser() -> argparse.ArgumentParser:
    return configuration.build_parser(
        "dnsrouter-feed", FEED_SETTINGS,
        "Secondary for a whole zone, primary for each of its shards: keeps the shards' "
        "secondaries and the router's routes following the zone.")


def load(args: argparse.Namespace) -> FeedConfig:
    """The feeder's configuration from its flags and file; ConfigError says what is wrong."""
    if not args.config:
        raise ConfigError("give --config FILE: the zone and its shards are set in the file")
    raw = configuration.read_file(args.config, FEED_SETTINGS, {"shard": SHARD_SETTINGS})
    values = configuration.parse_all(args, FEED_SETTINGS, raw)
    numbers = sorted({int(name.split("/")[0].split()[1]) for name in raw if "/" in name})
    if numbers != list(range(len(numbers))) or not numbers:
        raise ConfigError(f"{args.config}: shards must be [shard 0], [shard 1], ... with no gap "
                          f"(found {', '.join(f'[shard {n}]' for n in numbers) or 'none'})")
    shards = []
    for number in numbers:
        section = {s.name: raw[f"shard {number}/{s.key}"] if f"shard {number}/{s.key}" in raw else s.default
                   for s in SHARD_SETTINGS}
        try:
            shards.append(ShardConfig(**{name: setting.parse(section[name])
                                         for name, setting in zip(section, SHARD_SETTINGS)}))
        except ValueError as e:
            raise ConfigError(f"{args.config}: [shard {number}]: {e}") from None
    names = [s.shard_tsig.name for s in shards]
    if len(set(names)) != len(names):
        raise ConfigError(f"{args.config}: each shard needs a TSIG key name of its own: a secondary's key "
                          f"name says which shard it gets")
    primary = values["feed_primary_tsig"]
    if primary is not None and primary.name in names:
        raise ConfigError(f"{args.config}: [feed] primary_tsig must not be a shard's key")
    return FeedConfig(config_file=args.config, shards=tuple(shards), **values)


def describe(config: FeedConfig) -> str:
    """The effective configuration as an INI file (``--check-config``)."""
    text = configuration.describe(config, FEED_SETTINGS)
    for index, shard in enumerate(config.shards):
        text += "\n" + configuration.describe(shard, SHARD_SETTINGS, {"shard": f"shard {index}"})
    return text

