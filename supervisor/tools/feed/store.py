"""The zone, its shard map and its journal, on disk (SQLite).

The feeder must run on a machine smaller than the zone, so nothing here
holds the zone in memory: transfers stream in through ``ZoneTransaction``
(dnspython's transaction interface, which its transfer state machine
``dns.xfr.Inbound`` drives) and out through ``Store.axfr``/``Store.ixfr``,
a few rows at a time. RRsets are rows keyed by the owner's canonical key
(``shardmap.canonical_key``), so a shard's range of names is a range of
rows.

One transfer in is one SQLite transaction: the new records, the shard
map (made at the first load, then kept), each shard's share of the change
(kept as the journal IXFR out reads) and the serial commit together or
not at all. SQLite's write-ahead log makes that survive a SIGKILL at any
moment; readers (transfers out) see the last committed serial meanwhile.
"""
from __future__ import annotations

import json
import os
import secrets
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import dns.name
import dns.node
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.transaction

from ..shardmap import (ADDRESS_TYPES, NSEC_TYPES, ShardError, ShardMap, balance, canonical_key, is_common,
                        needs_addresses, nsec_proofs, record_bytes, top_label, with_signatures)

IN = dns.rdataclass.IN
SOA = dns.rdatatype.SOA
NS = dns.rdatatype.NS
FLUSH_EVERY = 2000  # RRsets a transfer holds in memory before they go to disk
WAL_KEPT = 64 << 20  # bytes of write-ahead log kept on disk after a checkpoint

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
-- One row per RRset; rdata: each record's wire form with a 2-octet length.
-- top: the label below the apex (NULL at the apex); common: every shard holds it.
CREATE TABLE IF NOT EXISTS rrsets (
    key BLOB NOT NULL, rdtype INTEGER NOT NULL, covers INTEGER NOT NULL, owner BLOB NOT NULL,
    ttl INTEGER NOT NULL, rdata BLOB NOT NULL, size INTEGER NOT NULL, top BLOB, common INTEGER NOT NULL,
    PRIMARY KEY (key, rdtype, covers)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rrsets_by_type ON rrsets (rdtype, key);
CREATE INDEX IF NOT EXISTS rrsets_by_top ON rrsets (top, size) WHERE common = 0;
CREATE INDEX IF NOT EXISTS rrsets_common ON rrsets (key) WHERE common = 1;
-- The RRsets a transfer in changed, as they were before it (had = 0: absent).
CREATE TABLE IF NOT EXISTS pending (
    key BLOB NOT NULL, rdtype INTEGER NOT NULL, covers INTEGER NOT NULL, owner BLOB NOT NULL,
    had INTEGER NOT NULL, ttl INTEGER, rdata BLOB, PRIMARY KEY (key, rdtype, covers)) WITHOUT ROWID;
-- What a shard holds beyond its range and the common records (shardmap.nsec_proofs, needs_addresses).
CREATE TABLE IF NOT EXISTS extras (
    shard INTEGER NOT NULL, key BLOB NOT NULL, rdtype INTEGER NOT NULL, covers INTEGER NOT NULL,
    PRIMARY KEY (shard, key, rdtype, covers)) WITHOUT ROWID;
-- In-zone name server targets by the shard holding the NS record (-1: every shard).
CREATE TABLE IF NOT EXISTS refs (
    holder INTEGER NOT NULL, target BLOB NOT NULL, name BLOB NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (holder, target)) WITHOUT ROWID;
-- One row per serial change; soa_*: the SOA record's wire form.
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY, serial_from INTEGER NOT NULL, serial_to INTEGER NOT NULL,
    soa_from BLOB NOT NULL, soa_to BLOB NOT NULL);
-- Each shard's share of a change: records to delete (op 0) and add (op 1), in order.
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER NOT NULL, shard INTEGER NOT NULL, op INTEGER NOT NULL, record BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS changes_by_seq ON changes (shard, seq, op);
"""


def pack(rdatas: list[bytes]) -> bytes:
    return b"".join(struct.pack("!H", len(r)) + r for r in sorted(rdatas))


def unpack(blob: bytes) -> list[bytes]:
    out, at = [], 0
    while at < len(blob):
        (length,) = struct.unpack_from("!H", blob, at)
        out.append(blob[at + 2:at + 2 + length])
        at += 2 + length
    return out


def records(owner: bytes, rdtype: int, ttl: int, rdata: bytes) -> list[bytes]:
    """An RRset row as records in wire format (uncompressed)."""
    head = owner + struct.pack("!HHI", rdtype, IN, ttl)
    return [head + struct.pack("!H", len(r)) + r for r in unpack(rdata)]


@dataclass(frozen=True)
class Applied:
    """What one transfer in did."""

    serial_from: int | None
    serial: int
    full: bool  # AXFR: the zone replaced, the journal restarted
    changes: tuple[int, ...]  # records deleted + added, per shard (empty for AXFR)


class StateError(Exception):
    """The state directory cannot be used (a message for the operator)."""


class Store(dns.transaction.TransactionManager):
    """The zone ``origin`` and its ``shards`` shards, in ``directory``/zone.sqlite."""

    def __init__(self, directory: str, origin: dns.name.Name, shards: int, journal_serials: int = 1000) -> None:
        self.origin = origin
        self.shards = shards
        self.journal_serials = journal_serials
        self.directory = directory
        self.path = os.path.join(directory, "zone.sqlite")
        self._local = threading.local()
        self.write_lock = threading.Lock()  # one transfer in at a time
        self.last_applied: Applied | None = None  # by the last transfer in that committed
        try:
            os.makedirs(directory, exist_ok=True)
            db = self.db()
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"state {directory}: {e}") from None
        db.executescript(SCHEMA)
        stored = dict(db.execute("SELECT name, value FROM meta").fetchall())
        if stored.get("origin", origin.to_text()) != origin.to_text():
            raise StateError(f"state {directory} holds the zone {stored['origin']}, not {origin}: "
                             f"give each zone a state directory of its own")
        if "lows" in stored and len(json.loads(stored["lows"])) + 1 != shards:
            raise StateError(f"state {directory} was made for {len(json.loads(stored['lows'])) + 1} shards, "
                             f"the configuration has {shards}: a new number of shards needs a second feeder "
                             f"with a new state directory and new keys")
        db.execute("INSERT OR IGNORE INTO meta VALUES ('origin', ?)", (origin.to_text(),))
        db.execute("INSERT OR IGNORE INTO meta VALUES ('id', ?)", (secrets.token_hex(4),))
        # Names this state's routes in the registry: another feeder of the zone has another.
        self.feeder_id: str = db.execute("SELECT value FROM meta WHERE name = 'id'").fetchone()[0]

    def db(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections are not shared between threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True, timeout=60)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")  # a committed serial survives a power cut too
            # Checkpoints come from ``checkpoint`` after the NOTIFYs, not inside a commit; and the
            # log does not stay as large as the largest transfer once it is copied.
            db.execute("PRAGMA wal_autocheckpoint = 0")
            db.execute(f"PRAGMA journal_size_limit = {WAL_KEPT}")
            self._local.db = db
        return db

    # -- dnspython's TransactionManager ---------------------------------------------------
    def reader(self) -> ZoneTransaction:
        return ZoneTransaction(self, False, read_only=True)

    def writer(self, replacement: bool = False) -> ZoneTransaction:
        return ZoneTransaction(self, replacement)

    def origin_information(self) -> tuple[dns.name.Name, bool, dns.name.Name]:
        return self.origin, False, self.origin

    def get_class(self) -> dns.rdataclass.RdataClass:
        return IN

    # -- what is stored ---------------------------------------------------------------
    def serial(self) -> int | None:
        row = self.db().execute("SELECT value FROM meta WHERE name = 'serial'").fetchone()
        return int(row[0]) if row else None

    def soa_record(self) -> bytes | None:
        """The SOA record in wire format."""
        row = self.db().execute("SELECT owner, ttl, rdata FROM rrsets WHERE key = ? AND rdtype = ?",
                                (canonical_key(self.origin), SOA)).fetchone()
        return records(row[0], SOA, row[1], row[2])[0] if row else None

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database, as far as no reader
        (a transfer out) still needs it; the rest goes at the next one."""
        self.db().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def shard_map(self) -> ShardMap | None:
        row = self.db().execute("SELECT value FROM meta WHERE name = 'lows'").fetchone()
        return ShardMap(self.origin, [bytes.fromhex(low) for low in json.loads(row[0])]) if row else None

    def loaded_at(self) -> float | None:
        row = self.db().execute("SELECT value FROM meta WHERE name = 'loaded_at'").fetchone()
        return float(row[0]) if row else None

    def axfr(self, shard: int) -> Iterator[bytes]:
        """The shard's records for an AXFR, the SOA first and last, from one snapshot."""
        db = self.db()
        shards = self.shard_map()
        db.execute("BEGIN")
        try:
            soa = self.soa_record()
            if soa is None or shards is None:
                return
            yield soa
            rows = db.execute("SELECT owner, rdtype, ttl, rdata FROM rrsets WHERE common = 1 AND rdtype != ? "
                              "ORDER BY key", (SOA,))
            for row in rows:
                yield from records(*row)
            low, high = shards.key_range(shard)
            rows = db.execute("SELECT owner, rdtype, ttl, rdata FROM rrsets WHERE key >= ? AND key < ? "
                              "AND common = 0 ORDER BY key", (low, high if high is not None else b"\xff"))
            for row in rows:
                yield from records(*row)
            rows = db.execute("SELECT r.owner, r.rdtype, r.ttl, r.rdata FROM extras e JOIN rrsets r "
                              "USING (key, rdtype, covers) WHERE e.shard = ? ORDER BY e.key", (shard,))
            for row in rows:
                yield from records(*row)
            yield soa
        finally:
            db.execute("COMMIT")

    def ixfr(self, shard: int, serial: int) -> Iterator[bytes] | None:
        """The shard's records for an IXFR from ``serial`` (RFC 1995: the new
        SOA, then per change the old SOA, deletions, new SOA, additions, then
        the new SOA again); None when the journal does not reach back to it."""
        db = self.db()
        db.execute("BEGIN")
        try:
            soa = self.soa_record()
            current = self.serial()
            steps: list | None = None
            if soa is None or current is None:
                pass
            elif serial == current:
                steps = []
            else:
                rows = db.execute("SELECT seq, serial_from, serial_to, soa_from, soa_to FROM journal "
                                  "WHERE seq >= (SELECT MAX(seq) FROM journal WHERE serial_from = ?) "
                                  "ORDER BY seq", (serial,)).fetchall()
                if rows and rows[-1][2] == current and all(a[2] == b[1] for a, b in zip(rows, rows[1:])):
                    steps = rows
        except BaseException:
            db.execute("COMMIT")
            raise
        if not steps or soa is None:
            db.execute("COMMIT")
            return None if steps is None or soa is None else iter([soa])
        return self._ixfr(db, shard, soa, steps)

    def _ixfr(self, db: sqlite3.Connection, shard: int, soa: bytes, steps: list) -> Iterator[bytes]:
        try:
            yield soa
            for seq, _, _, soa_from, soa_to in steps:
                yield soa_from
                rows = db.execute("SELECT op, record FROM changes WHERE shard = ? AND seq = ? ORDER BY op, rowid",
                                  (shard, seq))
                added = False
                for op, record in rows:
                    if op == 1 and not added:
                        yield soa_to
                        added = True
                    yield record
                if not added:
                    yield soa_to
            yield soa
        finally:
            db.execute("COMMIT")

    # -- the end of a transfer in -----------------------------------------------------------
    def finish(self, db: sqlite3.Connection, replacement: bool) -> Applied:
        """Everything that follows from the new records, in the transfer's SQL transaction."""
        row = db.execute("SELECT owner, ttl, rdata FROM rrsets WHERE key = ? AND rdtype = ?",
                         (canonical_key(self.origin), SOA)).fetchone()
        if row is None:
            raise ShardError(f"{self.origin}: the transfer left no SOA record")
        soa_to = records(row[0], SOA, row[1], row[2])[0]
        serial = _soa_serial(row[2])
        serial_from = self.serial()
        shards = self.shard_map()
        if shards is None:
            shards = self._make_map(db)
        if replacement:
            self._rebuild_refs(db, shards)
        else:
            self._update_refs(db, shards)
        old_extras = self._extras(db)
        new_extras = self._compute_extras(db, shards)
        db.execute("DELETE FROM extras")
        db.executemany("INSERT INTO extras VALUES (?, ?, ?, ?)",
                       [(k, *key) for k, keys in new_extras.items() for key in keys])
        counts: tuple[int, ...] = ()
        if replacement or serial_from is None:
            db.execute("DELETE FROM journal")
            db.execute("DELETE FROM changes")
        else:
            soa_from = db.execute("SELECT ttl, rdata FROM pending WHERE key = ? AND rdtype = ? AND had = 1",
                                  (canonical_key(self.origin), SOA)).fetchone()
            before = records(_wire(self.origin), SOA, soa_from[0], soa_from[1])[0] if soa_from else soa_to
            seq = db.execute("INSERT INTO journal (serial_from, serial_to, soa_from, soa_to) VALUES (?, ?, ?, ?)",
                             (serial_from, serial, before, soa_to)).lastrowid
            assert seq is not None
            counts = tuple(self._shard_changes(db, shards, k, seq, old_extras[k], new_extras[k])
                           for k in range(shards.count))
            oldest = db.execute("SELECT MAX(seq) - ? FROM journal", (self.journal_serials,)).fetchone()[0]
            if oldest is not None and oldest > 0:
                db.execute("DELETE FROM journal WHERE seq <= ?", (oldest,))
                db.execute("DELETE FROM changes WHERE seq <= ?", (oldest,))
        db.execute("DELETE FROM pending")
        db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                       [("serial", str(serial)), ("loaded_at", repr(time.time()))])
        return Applied(serial_from, serial, replacement, counts)

    def _make_map(self, db: sqlite3.Connection) -> ShardMap:
        """The shard map, balanced by bytes, made once at the first load and then kept."""
        count, total = db.execute("SELECT COUNT(DISTINCT top), COALESCE(SUM(size), 0) FROM rrsets "
                                  "WHERE common = 0").fetchone()
        rows = db.execute("SELECT top, SUM(size) FROM rrsets WHERE common = 0 GROUP BY top ORDER BY top")
        lows = balance(((bytes(top), size) for top, size in rows), count, total, self.shards)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('lows', ?)", (json.dumps([low.hex() for low in lows]),))
        return ShardMap(self.origin, lows)

    def _holder(self, shards: ShardMap, owner: bytes) -> int:
        name = dns.name.from_wire(owner, 0)[0]
        home = shards.home(name)
        return -1 if home is None or is_common(self.origin, name, NS, 0) else home

    def _add_refs(self, db: sqlite3.Connection, shards: ShardMap, holder: int, rdata: bytes, step: int) -> None:
        """Count the NS targets that some shard holding the NS record needs the
        addresses of: not those in the holder's own range (glue below a
        delegation, most of a large zone's), which would make every change
        look at every delegation."""
        for wire in unpack(rdata):
            target = dns.name.from_wire(wire, 0)[0]
            if any(needs_addresses(shards, k, target) for k in (range(shards.count) if holder == -1 else (holder,))):
                db.execute("INSERT INTO refs VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET n = n + excluded.n",
                           (holder, canonical_key(target), target.to_wire(), step))

    def _rebuild_refs(self, db: sqlite3.Connection, shards: ShardMap) -> None:
        db.execute("DELETE FROM refs")
        for owner, rdata in db.execute("SELECT owner, rdata FROM rrsets WHERE rdtype = ?", (NS,)):  # streamed
            self._add_refs(db, shards, self._holder(shards, owner), rdata, 1)

    def _update_refs(self, db: sqlite3.Connection, shards: ShardMap) -> None:
        rows = db.execute("SELECT p.owner, p.rdata, r.rdata FROM pending p LEFT JOIN rrsets r "
                          "USING (key, rdtype, covers) WHERE p.rdtype = ?", (NS,)).fetchall()
        for owner, before, after in rows:
            holder = self._holder(shards, owner)
            if before:
                self._add_refs(db, shards, holder, before, -1)
            if after:
                self._add_refs(db, shards, holder, after, 1)
        db.execute("DELETE FROM refs WHERE n <= 0")

    def _extras(self, db: sqlite3.Connection) -> dict[int, set[tuple]]:
        extras: dict[int, set[tuple]] = {k: set() for k in range(self.shards)}
        for shard, *key in db.execute("SELECT shard, key, rdtype, covers FROM extras"):
            extras[shard].add(tuple(key))
        return extras

    def _compute_extras(self, db: sqlite3.Connection, shards: ShardMap) -> dict[int, set[tuple]]:
        def covering(name: dns.name.Name) -> dns.name.Name | None:
            row = db.execute("SELECT owner FROM rrsets WHERE rdtype = ? AND key <= ? ORDER BY key DESC LIMIT 1",
                             (dns.rdatatype.NSEC, canonical_key(name))).fetchone()
            return dns.name.from_wire(row[0], 0)[0] if row else None

        def exists(name: dns.name.Name) -> bool:
            return db.execute("SELECT 1 FROM rrsets WHERE key = ? LIMIT 1", (canonical_key(name),)).fetchone() \
                is not None

        def rrsets_of(name: dns.name.Name, types: tuple[int, ...]) -> list[tuple]:
            key = canonical_key(name)
            return [(key, rdtype, covers) for rdtype, covers in
                    db.execute("SELECT rdtype, covers FROM rrsets WHERE key = ?", (key,))
                    if with_signatures(rdtype, covers, types)]

        extras: dict[int, set[tuple]] = {k: set() for k in range(shards.count)}
        for k, owners in nsec_proofs(shards, covering, exists).items():
            for owner in owners:
                if shards.home(owner) not in (k, None):
                    extras[k].update(rrsets_of(owner, NSEC_TYPES))
        for holder, name in db.execute("SELECT holder, name FROM refs WHERE n > 0").fetchall():
            target = dns.name.from_wire(name, 0)[0]
            for k in range(shards.count) if holder == -1 else (holder,):
                if needs_addresses(shards, k, target):
                    extras[k].update(rrsets_of(target, ADDRESS_TYPES))
        return extras

    def _shard_changes(self, db: sqlite3.Connection, shards: ShardMap, shard: int, seq: int,
                       old: set[tuple], new: set[tuple]) -> int:
        """Write the shard's share of the change: each RRset it held before or
        holds now that changed, or that it started or stopped holding."""
        rows = db.execute(
            "SELECT p.key, p.rdtype, p.covers, p.owner, p.had, p.ttl, p.rdata, r.ttl, r.rdata "
            "FROM pending p LEFT JOIN rrsets r USING (key, rdtype, covers) WHERE p.rdtype != ?", (SOA,))
        seen: set[tuple] = set()
        deleted: list[bytes] = []
        added: list[bytes] = []
        for key, rdtype, covers, owner, had, ttl_before, before, ttl_after, after in rows:
            seen.add((key, rdtype, covers))
            name = dns.name.from_wire(owner, 0)[0]
            own = shards.holds(shard, name, rdtype, covers)
            self._diff(owner, rdtype, (ttl_before, before) if had and (own or (key, rdtype, covers) in old) else None,
                       (ttl_after, after) if after is not None and (own or (key, rdtype, covers) in new) else None,
                       deleted, added)
        for key in (old ^ new) - seen:  # unchanged RRsets that came into or went out of the shard
            row = db.execute("SELECT owner, ttl, rdata FROM rrsets WHERE key = ? AND rdtype = ? AND covers = ?",
                             key).fetchone()
            if row is not None:
                state = (row[1], row[2])
                self._diff(row[0], key[1], state if key in old else None, state if key in new else None,
                           deleted, added)
        db.executemany("INSERT INTO changes VALUES (?, ?, 0, ?)", [(seq, shard, r) for r in deleted])
        db.executemany("INSERT INTO changes VALUES (?, ?, 1, ?)", [(seq, shard, r) for r in added])
        return len(deleted) + len(added)

    @staticmethod
    def _diff(owner: bytes, rdtype: int, before: tuple[int, bytes] | None, after: tuple[int, bytes] | None,
              deleted: list[bytes], added: list[bytes]) -> None:
        old = records(owner, rdtype, *before) if before else []
        new = records(owner, rdtype, *after) if after else []
        if before and after and before[0] != after[0]:  # a new TTL: the whole RRset again
            deleted.extend(old)
            added.extend(new)
            return
        kept = set(old) & set(new)
        deleted.extend(r for r in old if r not in kept)
        added.extend(r for r in new if r not in kept)


def _wire(name: dns.name.Name) -> bytes:
    """The name in wire format, uncompressed, as it came (case kept)."""
    wire = name.to_wire()
    assert wire is not None  # no file given: the bytes come back
    return wire


def _soa_serial(rdata: bytes) -> int:
    wire = unpack(rdata)[0]
    return struct.unpack("!I", wire[-20:-16])[0]


class ZoneTransaction(dns.transaction.Transaction):
    """A transfer in, applied to the rows as it streams (see the module docstring).

    Changed RRsets wait in memory, at most FLUSH_EVERY of them, and the first
    change of each RRset keeps its earlier state in ``pending`` for the
    shards' journal."""

    def __init__(self, store: Store, replacement: bool, read_only: bool = False) -> None:
        super().__init__(store, replacement, read_only)
        self.store = store
        self.origin = store.origin
        self.db = store.db()
        self._buffer: dict[tuple, tuple[dns.name.Name, dns.rdataset.Rdataset | None]] = {}
        # An AXFR's records as they come, in wire form: (owner, TTL, rdatas) by key.
        self._records: dict[tuple, tuple[dns.name.Name, int, set[bytes]]] = {}
        self._changed_any = False
        self.applied: Applied | None = None
        if read_only:
            self.db.execute("BEGIN")
            return
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("DELETE FROM pending")
        if replacement:
            self.db.execute("DELETE FROM rrsets")

    def add(self, *args: Any) -> None:
        """An AXFR adds the zone a record at a time (``dns.xfr.Inbound``:
        ``add(name, rrset)``): kept as wire bytes here, since dnspython's way,
        a new merged Rdataset per record, hashes every record again and was
        most of the time of a first load. Anything else goes dnspython's way."""
        if not (self.replacement and len(args) == 2 and isinstance(args[0], dns.name.Name)
                and isinstance(args[1], dns.rdataset.Rdataset) and args[1].rdtype != SOA
                and args[1].rdclass == IN):
            super().add(*args)
            return
        name, rdataset = args
        key = self._key(name, rdataset.rdtype, rdataset.covers)
        if key in self._buffer:  # put there by dnspython's way before: merge there
            super().add(*args)
            return
        self._changed_any = True
        held = self._records.get(key)
        if held is None:
            self._records[key] = (name, rdataset.ttl, {rdata.to_wire() for rdata in rdataset})
            if len(self._records) >= FLUSH_EVERY:
                self._flush()
        else:  # an RRset's TTL is its records' lowest, as dnspython's union makes it
            held[2].update(rdata.to_wire() for rdata in rdataset)
            if rdataset.ttl < held[1]:
                self._records[key] = (name, rdataset.ttl, held[2])

    def _key(self, name: dns.name.Name, rdtype: int, covers: int) -> tuple:
        return canonical_key(name), int(rdtype), int(covers)

    def _get_rdataset(self, name: dns.name.Name, rdtype: int, covers: int) -> dns.rdataset.Rdataset | None:
        key = self._key(name, rdtype, covers)
        if key in self._records:
            self._flush()
        if key in self._buffer:
            return self._buffer[key][1]
        row = self.db.execute("SELECT ttl, rdata FROM rrsets WHERE key = ? AND rdtype = ? AND covers = ?",
                              key).fetchone()
        if row is None:
            return None
        rdataset = dns.rdataset.Rdataset(IN, dns.rdatatype.RdataType.make(rdtype),
                                         dns.rdatatype.RdataType.make(covers), row[0])
        for wire in unpack(row[1]):
            rdataset.add(dns.rdata.from_wire(IN, rdataset.rdtype, wire, 0, len(wire)))
        return rdataset

    def _touch(self, name: dns.name.Name, key: tuple) -> None:
        self._changed_any = True
        if self.replacement or key in self._buffer:
            return
        # The first change of an RRset in this transfer: keep what it was.
        self.db.execute("INSERT OR IGNORE INTO pending SELECT key, rdtype, covers, owner, 1, ttl, rdata FROM rrsets "
                        "WHERE key = ? AND rdtype = ? AND covers = ?", key)
        self.db.execute("INSERT OR IGNORE INTO pending VALUES (?, ?, ?, ?, 0, NULL, NULL)",
                        (*key, _wire(name)))

    def _put_rdataset(self, name: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> None:
        key = self._key(name, rdataset.rdtype, rdataset.covers)
        if key in self._records:
            self._flush()
        self._touch(name, key)
        self._buffer[key] = (name, rdataset)
        if len(self._buffer) >= FLUSH_EVERY:
            self._flush()

    def _delete_rdataset(self, name: dns.name.Name, rdtype: int, covers: int) -> None:
        key = self._key(name, rdtype, covers)
        if key in self._records:
            self._flush()
        self._touch(name, key)
        self._buffer[key] = (name, None)

    def _delete_name(self, name: dns.name.Name) -> None:
        self._flush()
        for rdtype, covers in self.db.execute("SELECT rdtype, covers FROM rrsets WHERE key = ?",
                                              (canonical_key(name),)).fetchall():
            self._delete_rdataset(name, rdtype, covers)

    def _name_exists(self, name: dns.name.Name) -> bool:
        self._flush()
        return self.db.execute("SELECT 1 FROM rrsets WHERE key = ? LIMIT 1", (canonical_key(name),)).fetchone() \
            is not None

    def _flush(self) -> None:
        rows, gone = [], []
        for key, (name, rdataset) in self._buffer.items():
            if rdataset is None or len(rdataset) == 0:
                gone.append(key)
            else:
                rows.append(self._row(key, name, rdataset.ttl, [rdata.to_wire() for rdata in rdataset]))
        rows.extend(self._row(key, name, ttl, list(rdatas)) for key, (name, ttl, rdatas) in self._records.items())
        self.db.executemany("DELETE FROM rrsets WHERE key = ? AND rdtype = ? AND covers = ?", gone)
        self.db.executemany("INSERT OR REPLACE INTO rrsets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self._buffer.clear()
        self._records.clear()

    def _row(self, key: tuple, name: dns.name.Name, ttl: int, rdatas: list[bytes]) -> tuple:
        owner = _wire(name)
        return (*key, owner, ttl, pack(rdatas), record_bytes(len(owner), [len(r) for r in rdatas]),
                None if name == self.origin else top_label(self.origin, name),
                int(is_common(self.origin, name, key[1], key[2])))

    def _changed(self) -> bool:
        return self._changed_any

    def _end_transaction(self, commit: bool) -> None:
        if not commit or self.read_only:
            self._buffer.clear()
            self.db.execute("ROLLBACK")
            return
        try:
            self._flush()
            self.applied = self.store.finish(self.db, self.replacement)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.store.last_applied = self.applied

    def _set_origin(self, origin: Any) -> None:
        pass

    def _iterate_rdatasets(self) -> Iterator[tuple[dns.name.Name, dns.rdataset.Rdataset]]:
        raise NotImplementedError("a transfer only adds, replaces and deletes")

    def _iterate_names(self) -> Iterator[dns.name.Name]:
        raise NotImplementedError("a transfer only adds, replaces and deletes")

    def _get_node(self, name: dns.name.Name) -> dns.node.Node | None:
        raise NotImplementedError("a transfer only adds, replaces and deletes")

    def _origin_information(self) -> tuple[dns.name.Name, bool, dns.name.Name]:
        return self.store.origin_information()
