"""FileRegistry.scan: a directory of one-value files as registry records."""
from __future__ import annotations

import os

from dnsrouter.supervisor.registry import Record
from dnsrouter.supervisor.registry.files import MAX_READ, FileRegistry


def _write(path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def test_files_become_records_in_name_order(tmp_path):
    _write(tmp_path / "b", r"10.0.0.2:53,^b\.$")
    _write(tmp_path / "a", r"10.0.0.1:53,^a\.$")
    _write(tmp_path / "c-3f0e", "10.0.0.3:53,^c\\.$\n")
    records = FileRegistry(str(tmp_path)).scan()
    assert records == [
        Record("a", r"10.0.0.1:53,^a\.$", 0),
        Record("b", r"10.0.0.2:53,^b\.$", 1),
        Record("c-3f0e", "10.0.0.3:53,^c\\.$\n", 2),
    ]


def test_hidden_files_and_subdirectories_ignored(tmp_path):
    _write(tmp_path / "a", "10.0.0.1:53,x")
    _write(tmp_path / ".a.swp", "10.0.0.9:53,x")
    _write(tmp_path / ".tmp-write", "10.0.0.9:53,x")
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "inner", "10.0.0.9:53,x")
    (tmp_path / ".hidden-dir").mkdir()
    records = FileRegistry(str(tmp_path)).scan()
    assert records == [Record("a", "10.0.0.1:53,x", 0)]


def test_no_change_is_none(tmp_path):
    _write(tmp_path / "a", "10.0.0.1:53,x")
    registry = FileRegistry(str(tmp_path))
    assert registry.scan() == [Record("a", "10.0.0.1:53,x", 0)]
    assert registry.scan() is None
    assert registry.scan() is None


def test_edit_add_remove_seen_on_next_scan(tmp_path):
    _write(tmp_path / "a", "10.0.0.1:53,x")
    _write(tmp_path / "m", "10.0.0.2:53,y")
    registry = FileRegistry(str(tmp_path))
    assert [r.key for r in registry.scan()] == ["a", "m"]

    _write(tmp_path / "m", "10.0.0.2:5300,^yy$")  # edited in place
    assert registry.scan() == [Record("a", "10.0.0.1:53,x", 0),
                               Record("m", "10.0.0.2:5300,^yy$", 1)]
    assert registry.scan() is None

    _write(tmp_path / "b", "10.0.0.3:53,z")  # added, sorts between the others
    assert registry.scan() == [Record("a", "10.0.0.1:53,x", 0),
                               Record("b", "10.0.0.3:53,z", 1),
                               Record("m", "10.0.0.2:5300,^yy$", 2)]
    assert registry.scan() is None

    (tmp_path / "a").unlink()  # removed
    assert registry.scan() == [Record("b", "10.0.0.3:53,z", 0),
                               Record("m", "10.0.0.2:5300,^yy$", 1)]
    assert registry.scan() is None


def test_atomic_replace_seen(tmp_path):
    _write(tmp_path / "a", "10.0.0.1:53,x")
    registry = FileRegistry(str(tmp_path))
    registry.scan()
    _write(tmp_path / ".a.new", "10.0.0.7:53,x")  # same size, new inode
    assert registry.scan() is None  # the hidden temporary file is not a key
    os.replace(tmp_path / ".a.new", tmp_path / "a")
    assert registry.scan() == [Record("a", "10.0.0.7:53,x", 0)]


def test_same_size_edit_with_coarse_timestamps_seen(tmp_path):
    # Filesystems with coarse timestamps (ext4 with 128-byte inodes: 1 s,
    # FAT: 2 s, some NFS) give an in-place edit of the same size, made within
    # one tick of the previous write, an unchanged (inode, size, mtime). The
    # registry promises edits are seen "on any filesystem"; simulate the tick
    # by putting the old mtime back.
    path = tmp_path / "a"
    _write(path, "10.0.0.1:53,x")
    registry = FileRegistry(str(tmp_path))
    assert registry.scan() == [Record("a", "10.0.0.1:53,x", 0)]
    before = os.stat(path)
    _write(path, "10.0.0.2:53,x")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_ino == before.st_ino
    assert registry.scan() == [Record("a", "10.0.0.2:53,x", 0)]


def test_empty_and_missing_directory(tmp_path):
    registry = FileRegistry(str(tmp_path / "missing"))
    assert not registry.scan()  # nothing, and no exception
    (tmp_path / "missing").mkdir()
    _write(tmp_path / "missing" / "k", "10.0.0.1:53,x")
    assert registry.scan() == [Record("k", "10.0.0.1:53,x", 0)]
    (tmp_path / "missing" / "k").unlink()
    assert registry.scan() == []


def test_large_file_read_up_to_cap(tmp_path):
    (tmp_path / "big").write_bytes(b"10.0.0.1:53," + b"a" * (100 * 1024))
    records = FileRegistry(str(tmp_path)).scan()
    assert len(records) == 1
    assert len(records[0].value) == MAX_READ + 1 <= 65537
    assert records[0].value.startswith("10.0.0.1:53,aaa")


def test_non_utf8_content_is_surrogateescaped(tmp_path):
    (tmp_path / "bin").write_bytes(b"10.0.0.1:53,^a\xff$")
    [record] = FileRegistry(str(tmp_path)).scan()
    assert record.value == "10.0.0.1:53,^a\udcff$"
    assert record.value.encode("utf-8", "surrogateescape") == b"10.0.0.1:53,^a\xff$"


class _Running:
    """FileRegistry.run on its thread, counting full scans and keeping what it publishes."""

    def __init__(self, directory, scan_takes: float = 0.0) -> None:
        import threading
        import time

        self.registry = FileRegistry(str(directory), interval=0.02)
        self.polls = self.scans = 0
        self.published: list = []
        scan, directory = self.registry.scan, self.registry._directory

        def counting_scan():
            self.scans += 1
            time.sleep(scan_takes)  # a directory of thousands of files, looked at file by file
            return scan()

        def counting_poll():
            self.polls += 1
            return directory()

        self.registry.scan, self.registry._directory = counting_scan, counting_poll
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.registry.run, args=(self.published.append, self.stop))

    def values(self) -> list[str]:
        return [r.value for r in self.published[-1]] if self.published else []

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_running_sees_renames_at_once_and_edits_in_place_within_a_second(tmp_path):
    import time

    from support.net import wait_until

    _write(tmp_path / "a", "10.0.0.1:53,x")
    with _Running(tmp_path) as running:
        wait_until(lambda: running.values() == ["10.0.0.1:53,x"], 1, message="first scan")
        _write(tmp_path / ".b.tmp", "10.0.0.2:53,y")
        os.replace(tmp_path / ".b.tmp", tmp_path / "b")  # an atomic write: the directory changes
        wait_until(lambda: running.values() == ["10.0.0.1:53,x", "10.0.0.2:53,y"], 0.5, message="rename missed")
        with open(tmp_path / "a", "r+") as f:  # in place: same inode, the directory unchanged
            f.write("10.0.0.3")
        started = time.monotonic()
        wait_until(lambda: running.values()[0] == "10.0.0.3:53,x", 1.5, message="edit in place missed")
        assert time.monotonic() - started < 1.2
        # Polled every 20 ms, but the files themselves are looked at about once a second.
        polls, scans = running.polls, running.scans
        wait_until(lambda: running.polls >= polls + 25, 3, message="not polling")
        assert running.scans - scans <= 2, f"{running.scans - scans} full scans in 25 quiet polls"


def test_a_costly_full_scan_comes_less_often_and_renames_are_still_seen_at_once(tmp_path, monkeypatch):
    from support.net import wait_until

    from dnsrouter.supervisor.registry import files

    monkeypatch.setattr(files, "FULL_SCAN_SHARE", 0.02)  # a scan of 50 ms: 2.5 s apart
    _write(tmp_path / "a", "10.0.0.1:53,x")
    with _Running(tmp_path, scan_takes=0.05) as running:
        wait_until(lambda: running.values() == ["10.0.0.1:53,x"], 1, message="first scan")
        polls, scans = running.polls, running.scans
        wait_until(lambda: running.polls >= polls + 60, 5, message="not polling")  # 1.2 s at least
        assert running.scans == scans, "a full scan a second, though each took 5 % of that second"
        _write(tmp_path / ".b.tmp", "10.0.0.2:53,y")
        os.replace(tmp_path / ".b.tmp", tmp_path / "b")
        wait_until(lambda: running.values() == ["10.0.0.1:53,x", "10.0.0.2:53,y"], 0.5, message="rename missed")
