"""Self-checks of support.knot_xfr with Knot alone: a signing primary, plain secondaries, TSIG, delv.

If these fail, a failing test of the feed daemon (a secondary of the
whole zone, a primary of its shards) says nothing about the daemon.
"""
from __future__ import annotations

import base64

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.zone
import pytest

import support.knot_xfr
from support.delv import lookup, write_anchor
from support.knot_xfr import KnotPrimary, KnotSecondary, parse_tsig, tsig_key
from support.net import HOST, free_port, query, wait_until
from support.zones import zone_text

ORIGIN = "feed.test."
ZONE = zone_text(ORIGIN, ["www A 192.0.2.1", "old A 192.0.2.9", "keep A 192.0.2.10", "keep TXT two-types"])


def has_rrset(port: int, name: str, rdtype: str) -> bool:
    r = query(name, rdtype, port=port, transport="tcp", want_dnssec=True)
    return r.rcode() == dns.rcode.NOERROR and any(
        rrset.rdtype == dns.rdatatype.from_text(rdtype) for rrset in r.answer)


def chain_types(zone: dns.zone.Zone) -> set[str]:
    """Which denial chain a zone holds: {"NSEC"}, {"NSEC3"} (or both, half-way)."""
    return {dns.rdatatype.to_text(rdataset.rdtype) for _, node in zone.items() for rdataset in node
            if rdataset.rdtype in (dns.rdatatype.NSEC, dns.rdatatype.NSEC3)}


def test_tsig_key_is_fresh_hmac_sha256_of_32_bytes():
    a, b = tsig_key("xfr"), tsig_key("xfr")
    assert a != b
    algorithm, name, secret = parse_tsig(a)
    assert (algorithm, name) == ("hmac-sha256", "xfr")
    assert len(base64.b64decode(secret)) == 32
    with pytest.raises(ValueError):
        parse_tsig("hmac-sha256:xfr")


def test_missing_knot_tool_is_an_error_not_a_skip(monkeypatch):
    monkeypatch.setattr(support.knot_xfr.shutil, "which", lambda name: None)
    monkeypatch.setattr(support.knot_xfr.os, "access", lambda path, mode: False)
    with pytest.raises(RuntimeError, match="knsupdate not found.*knot-dnsutils"):
        support.knot_xfr.tool("knsupdate", "knot-dnsutils")


@pytest.mark.system
def test_update_reaches_a_tsig_secondary_by_notify_and_ixfr_and_validates(tmp_path):
    key = tsig_key("xfr")
    primary_port = free_port()
    # The secondary first: its primary is not up yet, and start() must not wait for the zone.
    with KnotSecondary(ORIGIN, HOST, primary_port, tsig=key) as secondary:
        assert secondary.serial() is None
        with KnotPrimary(ORIGIN, ZONE, port=primary_port, notify=[(HOST, secondary.port)],
                         transfer_tsig=key) as primary:
            first = primary.serial()
            assert first > 1  # signing counts as a change: serial-policy increment
            # The first copy comes by the NOTIFY knotd sends after loading.
            secondary.wait_serial(first, timeout=15)
            assert secondary.transfers() == ["AXFR"]

            # Transfers need the key: without it the primary refuses.
            with pytest.raises(dns.exception.DNSException):
                dns.query.inbound_xfr(HOST, dns.zone.Zone(ORIGIN, relativize=False),
                                      dns.message.make_query(ORIGIN, "AXFR"), port=primary.port, timeout=5)

            serial = primary.update(["add new.feed.test. 300 A 192.0.2.2", "del old.feed.test.",
                                     "del keep.feed.test. TXT"])
            assert serial > first
            assert has_rrset(primary.port, "new.feed.test.", "RRSIG")  # re-signed with the change
            secondary.wait_serial(serial, timeout=15)
            assert secondary.transfers() == ["AXFR", "IXFR"]
            assert not [line for line in secondary.transfer_failures() if "TSIG" in line]
            assert secondary.zone_records() == primary.zone_records()

            anchor = write_anchor(tmp_path / "anchor.conf", ORIGIN, primary.ksk())
            for server in (primary, secondary):  # the secondary serves the signatures and NSEC as received
                new = lookup(server.port, anchor, ORIGIN, "new.feed.test.", "A")
                assert (new.validated, new.kind) == (True, "answer"), new.describe()
                gone = lookup(server.port, anchor, ORIGIN, "old.feed.test.", "A")
                assert (gone.validated, gone.kind) == (True, "nxdomain"), gone.describe()
                nodata = lookup(server.port, anchor, ORIGIN, "keep.feed.test.", "TXT")
                assert (nodata.validated, nodata.kind) == (True, "nodata"), nodata.describe()


@pytest.mark.system
def test_switch_to_nsec3_keeps_updates_and_validates(tmp_path):
    primary_port = free_port()
    with KnotSecondary(ORIGIN, HOST, primary_port) as secondary:  # no TSIG this time
        with KnotPrimary(ORIGIN, ZONE, port=primary_port, notify=[(HOST, secondary.port)]) as primary:
            assert not has_rrset(primary.port, ORIGIN, "NSEC3PARAM")
            serial = primary.update(["add new.feed.test. 300 A 192.0.2.2"])
            anchor = write_anchor(tmp_path / "anchor.conf", ORIGIN, primary.ksk())

            nsec3_serial = primary.set_nsec3(True)
            assert nsec3_serial > serial
            assert has_rrset(primary.port, ORIGIN, "NSEC3PARAM")
            assert has_rrset(primary.port, "new.feed.test.", "A")  # the reload did not undo the update
            missing = lookup(primary.port, anchor, ORIGIN, "nothing.feed.test.", "A")
            assert (missing.validated, missing.kind) == (True, "nxdomain"), missing.describe()
            assert chain_types(primary.zone_records()) == {"NSEC3"}
            new = lookup(primary.port, anchor, ORIGIN, "new.feed.test.", "A")
            assert (new.validated, new.kind) == (True, "answer"), new.describe()

            secondary.wait_serial(nsec3_serial, timeout=15)
            assert has_rrset(secondary.port, ORIGIN, "NSEC3PARAM")
            assert secondary.zone_records() == primary.zone_records()

            back = primary.set_nsec3(False)
            assert back > nsec3_serial and not has_rrset(primary.port, ORIGIN, "NSEC3PARAM")
            assert chain_types(primary.zone_records()) == {"NSEC"}
            missing = lookup(primary.port, anchor, ORIGIN, "nothing.feed.test.", "A")
            assert (missing.validated, missing.kind) == (True, "nxdomain"), missing.describe()


@pytest.mark.system
def test_restarts_keep_the_zone_and_the_secondary_catches_up_by_ixfr():
    primary_port = free_port()
    with KnotSecondary(ORIGIN, HOST, primary_port) as secondary, \
            KnotPrimary(ORIGIN, ZONE, port=primary_port, notify=[(HOST, secondary.port)]) as primary:
        before = secondary.wait_serial(primary.serial(), timeout=15)
        secondary.stop()
        serial = primary.update(["add later.feed.test. 300 A 192.0.2.3"])
        secondary.start()
        # It may be NOTIFYed for the update (knotd sends a second later) or not:
        # either way it served its old serial first, and catches up by IXFR.
        assert secondary.serial() in (before, serial)
        secondary.refresh()
        secondary.wait_serial(serial, timeout=15)
        assert secondary.transfers() == ["AXFR", "IXFR"]

        secondary.retransfer()
        wait_until(lambda: secondary.transfers() == ["AXFR", "IXFR", "AXFR"], timeout=10,
                   message=f"no AXFR after zone-retransfer\n{secondary.log_tail()}")
        assert secondary.serial() == serial

        # The primary started again serves its journal: the update, the same keys, the same serial.
        ksk = primary.ksk()
        primary.stop()
        primary.start()
        assert primary.serial() == serial
        assert has_rrset(primary.port, "later.feed.test.", "A")
        assert primary.ksk() == ksk
        newer = primary.update(["del later.feed.test."])
        secondary.wait_serial(newer, timeout=15)
        assert secondary.transfers()[-1] == "IXFR"
        assert secondary.zone_records() == primary.zone_records()


@pytest.mark.system
def test_secondary_with_a_wrong_tsig_key_gets_no_zone():
    key = tsig_key("xfr")
    wrong = tsig_key("xfr")  # the same name, another secret
    primary_port = free_port()
    with KnotPrimary(ORIGIN, ZONE, port=primary_port, transfer_tsig=key) as primary, \
            KnotSecondary(ORIGIN, HOST, primary_port, tsig=wrong) as secondary:
        # Its first attempt comes at once (the primary is up); one more on demand.
        wait_until(lambda: any("TSIG" in line for line in secondary.transfer_failures()), timeout=10,
                   message=f"no failed transfer in the secondary's log\n{secondary.log_tail()}")
        failures = len(secondary.transfer_failures())
        secondary.refresh()
        wait_until(lambda: len(secondary.transfer_failures()) > failures, timeout=10,
                   message=f"zone-refresh did not fail again\n{secondary.log_tail()}")
        assert secondary.serial() is None
        assert secondary.transfers() == []
        assert primary.serial() > 1
        # The right key still works from another secondary.
        with KnotSecondary(ORIGIN, HOST, primary_port, tsig=key) as right:
            right.refresh()
            assert right.wait_serial(primary.serial(), timeout=15) == primary.serial()


@pytest.mark.system
def test_nsec3_primary_from_the_start_and_a_refused_update(tmp_path):
    with KnotPrimary(ORIGIN, ZONE, nsec3=True) as primary:
        params = query(ORIGIN, "NSEC3PARAM", port=primary.port, transport="tcp").answer
        assert [rd.to_text() for rd in params[0]] == ["1 0 0 -"]  # SHA-1, no opt-out, 0 iterations, no salt
        assert chain_types(primary.zone_records()) == {"NSEC3"}
        anchor = write_anchor(tmp_path / "anchor.conf", ORIGIN, primary.ksk())
        missing = lookup(primary.port, anchor, ORIGIN, "nothing.feed.test.", "A")
        assert (missing.validated, missing.kind) == (True, "nxdomain"), missing.describe()
        serial = primary.serial()
        with pytest.raises(RuntimeError, match="NOTZONE"):
            primary.update(["add www.elsewhere.test. 300 A 192.0.2.1"])
        assert primary.set_nsec3(True) == serial == primary.serial()  # already so: nothing to do
