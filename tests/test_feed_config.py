"""dnsrouter-feed's configuration and state, without servers: the same INI
rules as the router's, every mistake named with file:line, and a state that
a SIGKILL in the middle of a transfer leaves at the last serial."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import dns.name
import pytest

from dnsrouter.errors import ConfigError
from dnsrouter.supervisor.tools.feed import settings
from dnsrouter.supervisor.tools.feed.main import main
from dnsrouter.supervisor.tools.feed.store import Store

KEY = "hmac-sha256:shard0:" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA=="
CONFIG = f"""\
[feed]
zone = example.com.
primary = 192.0.2.1:53
listen = 127.0.0.1:5353
state = {{state}}

[shard 0]
tsig = {KEY}
backends = 127.0.0.1:5301, [::1]:5301

[shard 1]
tsig = {KEY.replace("shard0", "shard1")}
backends = 127.0.0.1:5302
"""


def load(tmp_path: Path, text: str, *argv: str) -> settings.FeedConfig:
    path = tmp_path / "feed.ini"
    path.write_text(text.replace("{state}", str(tmp_path / "state")))
    return settings.load(settings.build_parser().parse_args(["--config", str(path), *argv]))


def test_a_whole_configuration_parses_into_typed_settings(tmp_path):
    config = load(tmp_path, CONFIG)
    assert config.feed_zone == dns.name.from_text("example.com.")
    assert str(config.feed_primary) == "192.0.2.1:53" and config.feed_primary_tsig is None
    assert [len(s.shard_backends) for s in config.shards] == [2, 1]
    assert config.shards[1].shard_tsig.name == dns.name.from_text("shard1")
    assert config.feed_journal_serials == 1000 and config.registry_prefix == "/dnsrouter/"  # the router's default
    assert load(tmp_path, CONFIG, "--prefix", "/other").registry_prefix == "/other/"  # the router's flags too


@pytest.mark.parametrize("change, message", [
    (("[feed]", "[feed]\ncolour = blue"), r"feed.ini:2: unknown key 'colour' in \[feed\]"),
    (("[shard 1]", "[shards 1]"), r"feed.ini:11: unknown section \[shards 1\] \(or \[shard K\]"),
    (("[shard 1]", "[shard 2]"), r"no gap \(found \[shard 0\], \[shard 2\]\)"),
    (("backends = 127.0.0.1:5302", "backends ="), r"feed.ini:13: \[shard 1\] backends: required: the addresses"),
    (("backends = 127.0.0.1:5302", "backends = 127.0.0.1:5302\nweight = 2"), r"feed.ini:14: unknown key 'weight'"),
    ((KEY.replace("shard0", "shard1"), KEY), r"each shard needs a TSIG key name of its own"),
    ((KEY, "hmac-sha256:shard0"), r"not ALGORITHM:NAME:BASE64SECRET"),
    ((KEY, "hmac-nope:shard0:c2VjcmV0"), r"unknown TSIG algorithm 'hmac-nope'"),
    ((KEY, "hmac-sha256:shard0:not*base64"), r"the secret is not base64"),
    (("zone = example.com.", "zone ="), r"\[feed\] zone: required"),
    (("primary = 192.0.2.1:53", "primary = ns1.example.com:53"), r"feed.ini:3: \[feed\] primary"),
    (("listen = 127.0.0.1:5353\n", "listen = 127.0.0.1:5353\nprimary_tsig = " + KEY + "\n"),
     r"primary_tsig must not be a shard's key"),
])
def test_every_mistake_is_named(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, CONFIG.replace(*change))


def test_check_config_prints_every_setting_and_no_secret(tmp_path, capsys):
    path = tmp_path / "feed.ini"
    path.write_text(CONFIG.replace("{state}", str(tmp_path / "state")))
    assert main(["--config", str(path), "--check-config"]) == 0
    out = capsys.readouterr().out
    assert "[shard 0]\ntsig = hmac-sha256:shard0:********\nbackends = 127.0.0.1:5301, [::1]:5301" in out
    assert "c2VjcmV0" not in out
    reread = load(tmp_path, out.replace("hmac-sha256:shard0:********", KEY).replace(
        "hmac-sha256:shard1:********", KEY.replace("shard0", "shard1")))
    assert reread.shards == load(tmp_path, CONFIG).shards  # the output is a configuration file again
    path.write_text("[feed]\nzone = example.com.\n")
    assert main(["--config", str(path), "--check-config"]) == 2
    assert "dnsrouter-feed:" in capsys.readouterr().err
    assert main([]) == 2 and "give --config FILE" in capsys.readouterr().err


def test_the_documented_example_parses(tmp_path):
    example = Path(__file__).parent.parent / "conf" / "dnsrouter-feed.ini"
    config = settings.load(settings.build_parser().parse_args(["--config", str(example)]))
    assert len(config.shards) == 3
    text = example.read_text()
    for setting in settings.FEED_SETTINGS + settings.SHARD_SETTINGS:  # every key is documented
        assert f"{setting.key} =" in text, setting.key


# A transfer in, killed in the middle of its SQL transaction (the worst moment: records
# of the new serial written, the serial and the journal not yet).
KILLED_MIDWAY = textwrap.dedent("""
    import os, signal, sys
    import dns.name, dns.rdata
    from dnsrouter.supervisor.tools.feed.store import Store
    origin = dns.name.from_text("feed.test.")
    store = Store(sys.argv[1], origin, 2)
    def rdata(t, text):
        return dns.rdata.from_text("IN", t, text, origin=origin, relativize=False)
    replacement = sys.argv[2] == "axfr"
    serial = int(sys.argv[3])
    txn = store.writer(replacement)
    txn.replace(origin, 300, rdata("SOA", f"ns1 host {serial} 1 1 1 1"))
    for i in range(5000):
        txn.replace(dns.name.from_text(f"h{i}.l{i % 7}", origin), 300, rdata("A", "192.0.2.1"))
    if sys.argv[4] == "kill":
        txn._flush()  # the records on disk, uncommitted
        os.kill(os.getpid(), signal.SIGKILL)
    txn.commit()
""")


@pytest.mark.system
def test_a_sigkill_in_the_middle_of_a_transfer_leaves_the_last_serial(tmp_path):
    def run(kind: str, serial: int, end: str) -> int:
        return subprocess.run([sys.executable, "-c", KILLED_MIDWAY, str(tmp_path), kind, str(serial), end],
                              timeout=60).returncode

    assert run("axfr", 1, "kill") == -signal.SIGKILL
    assert Store(str(tmp_path), dns.name.from_text("feed.test."), 2).serial() is None
    assert run("axfr", 1, "commit") == 0
    assert run("ixfr", 2, "kill") == -signal.SIGKILL
    store = Store(str(tmp_path), dns.name.from_text("feed.test."), 2)
    assert store.serial() == 1
    assert store.db().execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert store.ixfr(0, 1) is not None  # the next start asks the primary for an IXFR from serial 1
    assert run("ixfr", 2, "commit") == 0
    assert Store(str(tmp_path), dns.name.from_text("feed.test."), 2).serial() == 2
    assert os.path.exists(tmp_path / "zone.sqlite")
