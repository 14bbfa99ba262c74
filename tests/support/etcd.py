"""Real etcd servers for tests: one member, or a static three-member cluster.

Everything listens on 127.0.0.1 on free ports, in its own temporary data
directory. etcd serves its v3 API (gRPC) always; the v2 keys API is enabled
too (``--enable-v2``) for the v2 registry's tests. Readiness is polled with a
deadline; nothing here sleeps blindly.

The v2 helpers (``put``, ``delete``, ``get``, ...) speak HTTP to /v2/keys;
the v3 helpers (``put3``, ``delete3``, ``read_prefix3``, ``grant_lease``,
``compact``, ``etcdctl``) use etcdctl or the v3 client library.

A missing ``etcd`` binary raises (so the test fails): etcd is a declared test
dependency (Debian package ``etcd-server``), not an optional one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterator, NamedTuple, Optional, Sequence

from support.net import free_port as _free_port, wait_until
from support.processes import spawn, stop


class _Managed:
    """``with`` starts it (cleaning up if the start fails) and stops and cleans up after."""

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self.cleanup()

ETCD = os.environ.get("ETCD_BINARY", "etcd")
START_TIMEOUT = 20.0


def _request(method: str, url: str, data: Optional[dict] = None,
             timeout: float = 5.0) -> dict:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        # etcd answers errors (key not found, ...) as JSON bodies
        return json.loads(e.read())


def _key_url(url: str, key: str) -> str:
    return url.rstrip("/") + "/v2/keys/" + urllib.parse.quote(key.lstrip("/"), safe="/")


def put(url: str, key: str, value: Optional[str], ttl: Optional[float] = None,
        **params: Any) -> dict:
    """``curl -XPUT $url/v2/keys/$key -d value=...``; returns etcd's JSON.

    Extra ``params`` (prevExist, prevValue, dir, ...) are passed as form
    fields; ``value=None`` sends no value (for ``dir="true"``).
    """
    data: dict = {**params} if value is None else {"value": value, **params}
    if ttl is not None:
        data["ttl"] = ttl
    return _request("PUT", _key_url(url, key), data)


def delete(url: str, key: str, **params: Any) -> dict:
    """``curl -XDELETE $url/v2/keys/$key``; returns etcd's JSON."""
    q = urllib.parse.urlencode(params)
    return _request("DELETE", _key_url(url, key) + ("?" + q if q else ""))


def get(url: str, key: str, **params: Any) -> dict:
    """``curl $url/v2/keys/$key``; returns etcd's JSON."""
    q = urllib.parse.urlencode(params)
    return _request("GET", _key_url(url, key) + ("?" + q if q else ""))


def enable_auth(url: str, root_password: str) -> None:
    """Turn on v2 authentication with user ``root``. The guest role keeps its
    access, so requests without credentials still work; wrong ones do not."""
    body = json.dumps({"user": "root", "password": root_password}).encode()
    for path, data in (("/v2/auth/users/root", body), ("/v2/auth/enable", None)):
        req = urllib.request.Request(url + path, data=data, method="PUT")
        with urllib.request.urlopen(req, timeout=5):
            pass


def read_dir(url: str, prefix: str) -> dict[str, tuple[str, int]]:
    """The plain keys directly under ``prefix``: {name: (value, createdIndex)}."""
    res = get(url, prefix, quorum="true")
    out = {}
    for node in res.get("node", {}).get("nodes", []):
        if not node.get("dir"):
            out[node["key"].rsplit("/", 1)[1]] = (node.get("value", ""), node["createdIndex"])
    return out


class TLSFiles(NamedTuple):
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls_files(directory: str) -> TLSFiles:
    """A throwaway CA, a server certificate for IP 127.0.0.1 and a client
    certificate, made with the ``openssl`` command line tool."""
    def path(name: str) -> str:
        return os.path.join(directory, name)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", path("ca.key"), "-out", path("ca.pem"))
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        with open(path(name + ".ext"), "w") as f:
            f.write(ext)
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", path(name + ".key"), "-out", path(name + ".csr"))
        openssl("x509", "-req", "-days", "2", "-in", path(name + ".csr"), "-CA", path("ca.pem"),
                "-CAkey", path("ca.key"), "-CAcreateserial", "-extfile", path(name + ".ext"),
                "-out", path(name + ".pem"))
    return TLSFiles(path("ca.pem"), path("server.pem"), path("server.key"),
                    path("client.pem"), path("client.key"))


class EtcdServer(_Managed):
    """One etcd member on 127.0.0.1.

    Ports and the data directory are chosen at construction and kept across
    ``stop()``/``kill()``/``start()``, so a restart is the same server with
    the same data. Used as a context manager it starts (if not started) and
    on exit stops and removes its data.

    With ``tls``, etcd also serves ``tls_url`` (https, client certificates
    required); ``url`` stays plain http for the test's own requests.
    """

    def __init__(self, name: str = "default", *, client_port: Optional[int] = None,
                 peer_port: Optional[int] = None, initial_cluster: Optional[str] = None,
                 workdir: Optional[str] = None, tls: Optional[TLSFiles] = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.name = name
        self.client_port = client_port or _free_port("tcp")
        self.peer_port = peer_port or _free_port("tcp")
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.tls = tls
        self.extra_args = list(extra_args)
        self.tls_url = f"https://127.0.0.1:{_free_port('tcp')}" if tls else None
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="etcd-test-")
        self.data_dir = os.path.join(self.workdir, f"{name}.etcd")
        self.log_path = os.path.join(self.workdir, f"{name}.log")
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> list[str]:
        tls = []
        if self.tls:
            tls = ["--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key,
                   "--trusted-ca-file", self.tls.ca, "--client-cert-auth"]
        return [
            ETCD,
            "--name", self.name,
            "--data-dir", self.data_dir,
            "--enable-v2",
            "--listen-client-urls", ",".join(filter(None, [self.url, self.tls_url])),
            *tls,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", "dnsrouter-test",
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
            # small snapshots keep restarts fast; short raft timers keep
            # elections (cluster start, member killed) well under a second
            "--snapshot-count", "2000",
            "--heartbeat-interval", "25",
            "--election-timeout", "250",
            *self.extra_args,
        ]

    def start(self, wait: bool = True) -> "EtcdServer":
        """Start (again) on the same ports and data dir; wait until it serves."""
        if self.running:
            return self
        if shutil.which(ETCD) is None:
            raise RuntimeError(f"etcd binary {ETCD!r} not found (Debian package etcd-server)")
        log = open(self.log_path, "ab")
        try:
            self.proc = spawn(self.command(), stdout=log, stderr=log)
        finally:
            log.close()
        if wait:
            self.wait_ready()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """True when the member has a leader and its v2 keys API answers."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                if json.loads(r.read()).get("health") != "true":
                    return False
            with urllib.request.urlopen(self.url + "/v2/keys/", timeout=1) as r:
                return r.status == 200
        except (OSError, ValueError):
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd {self.name} exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            return self.healthy()

        try:
            wait_until(ready, timeout)
        except AssertionError:
            raise RuntimeError(f"etcd {self.name} not ready after {timeout}s:\n" + self.log_tail()) from None

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def _signal(self, sig: int, timeout: float) -> None:
        stop(self.proc, timeout, sig=sig)
        self.proc = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, escalating to SIGKILL after ``timeout``."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, no goodbye to clients or peers."""
        self._signal(signal.SIGKILL, 10.0)

    def cleanup(self) -> None:
        self.kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class EtcdCluster(_Managed):
    """A static cluster of ``n`` members on 127.0.0.1 (``--initial-cluster``)."""

    def __init__(self, n: int = 3) -> None:
        self.workdir = tempfile.mkdtemp(prefix="etcd-cluster-")
        ports = [(_free_port("tcp"), _free_port("tcp")) for _ in range(n)]
        initial = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
        self.members = [EtcdServer(f"m{i}", client_port=c, peer_port=p,
                                   initial_cluster=initial, workdir=self.workdir)
                        for i, (c, p) in enumerate(ports)]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self) -> "EtcdCluster":
        # all members must be up before any has a quorum: start, then wait
        for m in self.members:
            m.start(wait=False)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every running member has a leader and serves.

        After a member is killed, writes through the others hang until they
        elect a new leader (if it was the leader): call this first.
        """
        for m in self.members:
            if m.running:
                m.wait_ready(timeout)

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def cleanup(self) -> None:
        for m in self.members:
            m.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- v3 API helpers ----------------------------------------------------------

ETCDCTL = os.environ.get("ETCDCTL_BINARY", "etcdctl")


def etcdctl(url: str, *args: str, user: Optional[str] = None) -> str:
    """``ETCDCTL_API=3 etcdctl --endpoints URL ARGS...``; its stdout (raises on failure)."""
    if shutil.which(ETCDCTL) is None:
        raise RuntimeError(f"etcdctl binary {ETCDCTL!r} not found (Debian package etcd-client)")
    command = [ETCDCTL, "--endpoints", url, "--command-timeout", "5s"]
    if user is not None:
        command += ["--user", user]
    res = subprocess.run([*command, *args], capture_output=True, text=True, timeout=20,
                         env={**os.environ, "ETCDCTL_API": "3"})
    if res.returncode != 0:
        raise RuntimeError(f"etcdctl {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


@contextlib.contextmanager
def v3_client(url: str) -> Iterator[Any]:
    """A plain v3 client (the library dnsrouter uses) for the test's own requests."""
    import pyetcd  # the test's side: only tests of the v3 registry need it

    u = urllib.parse.urlsplit(url)
    client = pyetcd.client(host=u.hostname, port=u.port, timeout=10)
    try:
        yield client
    finally:
        client.close()


def put3(url: str, key: str, value: str, lease: Optional[int] = None) -> int:
    """Put ``key`` (on ``lease``); returns the revision of the write."""
    with v3_client(url) as c:
        return c.put(key, value, lease=lease).header.revision


def delete3(url: str, key: str) -> bool:
    with v3_client(url) as c:
        return bool(c.delete(key))


def grant_lease(url: str, ttl: int) -> int:
    """A new lease of ``ttl`` seconds, not kept alive; its id."""
    with v3_client(url) as c:
        return c.lease(ttl).id


def revision(url: str) -> int:
    """The store's current revision."""
    with v3_client(url) as c:
        return c.get_response("/").header.revision


def compact(url: str, rev: Optional[int] = None) -> int:
    """Compact the history up to ``rev`` (default: the current revision); returns it."""
    rev = rev or revision(url)
    with v3_client(url) as c:
        c.compact(rev, physical=True)
    return rev


def read_prefix3(url: str, prefix: str) -> dict[str, tuple[str, int]]:
    """The keys directly under ``prefix``: {name: (value, create_revision)}."""
    with v3_client(url) as c:
        res = c.get_prefix_response(prefix)
    out = {}
    for kv in res.kvs:
        name = kv.key.decode("utf-8", "backslashreplace")[len(prefix):]
        if name and "/" not in name:
            out[name] = (kv.value.decode("utf-8", "replace"), kv.create_revision)
    return out


def enable_auth3(url: str, root_password: str) -> None:
    """Turn on v3 authentication with user ``root`` (role root). Requests
    without credentials are refused from then on."""
    etcdctl(url, "user", "add", f"root:{root_password}")
    etcdctl(url, "auth", "enable")
