"""The supervisor's main loop, in the manner of gunicorn's arbiter.

Signal handlers only record the signal; the loop dispatches it by name
(``handle_term``, ``handle_hup``). Registry and health threads hand their
news to the loop through a queue; only the loop touches the route table
and the workers, so none of that needs a lock.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import Any, Callable

import dns.exception
import dns.name
import setproctitle

from dnsrouter import control, logs
from dnsrouter.address import Address, parse_address
from dnsrouter.errors import ConfigError
from dnsrouter.purges import PurgeLog
from dnsrouter.ratelimit import RateTable
from dnsrouter.settings import SETTINGS, Config

from . import privileges, sockets, workerset
from .health import HealthChecker, HealthSettings
from .metrics import Metrics
from .registry import Registry
from .table import RouteTable

log = logging.getLogger("dnsrouter.supervisor")

RESPAWN_BACKOFF_MAX = 5.0
YOUNG = 2.0  # seconds of serving after which a worker's death is not a crash loop
FIRST_ROUTES_WAIT = 10.0  # seconds at most that workers wait for the registry and first checks
# A worker reports the snapshot it serves once a REPORT_INTERVAL: one still on
# an older one this long after a publish did not apply it.
APPLY_WAIT = 3 * control.REPORT_INTERVAL


class BootError(Exception):
    """a worker failed to start"""


def _describe(values: dict[str, Any]) -> str:
    """``{"forward_timeout": 0.3}`` as ``[forward] timeout = 0.3``."""
    labels = {s.name: s.label for s in SETTINGS}
    return ", ".join(f"{labels[name]} = {value}" for name, value in values.items()) or "nothing"


class Supervisor:
    SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1")

    def __init__(self, config: Config, worker_main: Callable[[control.WorkerSpec, Any], None],
                 registry: Registry,
                 reload_config: Callable[[], tuple[Config, list[str], list[str]]] | None = None) -> None:
        self.config = config
        self.worker_main = worker_main
        self.registry = registry
        self.reload_config = reload_config
        self.table = RouteTable()
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.workers: dict[int, workerset.WorkerHandle] = {}
        self.sockets: list = []
        self.stop_event = threading.Event()
        self._signals: list[str] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._respawn_at: dict[int, float] = {}
        self._deaths: dict[int, list[float]] = {}
        self.restarts = 0
        self.cpus = workerset.usable_cpus()
        self._wire = self.table.snapshot().to_wire()  # empty until the registry speaks
        self.health = HealthChecker(self._health_settings(config), lambda up, checked: self.post("health", (up, checked)))
        self.metrics = Metrics(self._metrics_state, control.LATENCY_BUCKETS)
        self.purges = PurgeLog()  # NOTIFY and dnsrouterctl purge reach every worker's cache through it
        # One table of accounts per limit, every worker charging it: a limit holds for the router.
        self.limits = RateTable(config.limits_table_size) if config.limits_client_qps else None
        self.rrl = RateTable(config.rrl_table_size) if config.rrl_responses_per_second else None
        self.loaded = False  # the registry has published at least once
        # Backends whose first check the loop has taken in: the health thread's
        # own states run ahead of the "health" news still in the queue.
        self.checked: frozenset = frozenset()
        # Workers get their first routes once the registry has loaded and every
        # backend had its first check: a router (re)starting under load must not
        # answer SERVFAIL for want of a check. Queries wait in the sockets
        # meanwhile. Bounded, for a registry that cannot be reached at start.
        self.serving = False
        self._serve_by = time.monotonic() + FIRST_ROUTES_WAIT
        self._published_at = time.monotonic()
        self._metrics_address: Address | None = None
        self._pidfile: str | None = None

    @staticmethod
    def _health_settings(config: Config) -> HealthSettings:
        return HealthSettings(config.health_interval, config.health_timeout,
                              config.health_fall, config.health_rise)

    # -- plumbing ----------------------------------------------------------
    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass  # already awake

    def post(self, kind: str, payload: Any) -> None:
        """For other threads: hand news to the main loop."""
        self.events.put((kind, payload))
        self.wake()

    def _on_signal(self, signum: int, frame) -> None:
        self._signals.append(signal.Signals(signum).name)
        self.wake()

    # -- start and run -------------------------------------------------------
    def run(self) -> int:
        setproctitle.setproctitle("dnsrouter: supervisor")
        privileges.check(self.config)
        privileges.check_user(self.config)
        workers = self.config.server_workers
        cpus = [self._cpu(i) for i in range(workers)] if self.config.server_socket_affinity else []
        self.sockets = sockets.bind(self.config.server_listen, workers, cpus,
                                    udp_buffer=self.config.server_udp_receive_buffer)
        self._serve_metrics()
        if self.config.server_pidfile:
            self._write_pidfile(self.config.server_pidfile)
        if self.config.server_user:
            privileges.drop(self.config.server_user)
        elif os.geteuid() == 0:
            log.warning("running as root: set [server] user to drop root after binding")
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._on_signal)
        self.health.start()
        threading.Thread(target=self.registry.run, name="registry",
                         args=(lambda records: self.post("records", records), self.stop_event),
                         daemon=True).start()
        log.info("dnsrouter listening on %s with %d workers",
                 ", ".join(str(a) for a in self.config.server_listen), self.config.server_workers)
        for index in range(self.config.server_workers):
            self.spawn(index)
        try:
            return self.loop()
        except BootError as e:
            log.error("%s; stopping", e)
            self.kill_all()
            return 1

    def spawn(self, index: int) -> None:
        udp, tcp = self.sockets[index]
        # The current config: a worker replaced after a SIGHUP starts with the live settings applied.
        spec = control.WorkerSpec(index, self._cpu(index), udp, tcp, self.config, self.purges,
                                  self.limits, self.rrl)
        handle = workerset.spawn(spec, self.worker_main)
        self.workers[index] = handle
        self._send_routes([handle])
        log.debug("worker %d started, pid %s", index, handle.pid)

    def _cpu(self, index: int) -> int | None:
        setting = self.config.server_cpu_affinity
        if isinstance(setting, tuple):
            return setting[index % len(setting)]
        if setting == "off" or self.config.server_workers > len(self.cpus):
            return None  # auto, with more workers than CPUs: let the scheduler place them
        return self.cpus[index % len(self.cpus)]

    def _write_pidfile(self, path: str) -> None:
        try:
            with open(path, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as e:
            raise ConfigError(f"cannot write pidfile {path}: {e.strerror or e}") from None
        self._pidfile = path

    def loop(self) -> int:
        while True:
            self._dispatch_signals()
            if self.stop_event.is_set():
                return self.shutdown()
            self._drain_events()
            self._serve_when_ready()
            self._respawn_due()
            self._check_heartbeats()
            handles = list(self.workers.values())
            timeout = 0.5
            if self._respawn_at:  # wake up for the next respawn, not half a second later
                timeout = max(0.0, min(timeout, min(self._respawn_at.values()) - time.monotonic()))
            ready = wait([self._wake_r] + [h.conn for h in handles] + [h.process.sentinel for h in handles],
                         timeout=timeout)
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            for handle in handles:
                if handle.conn in ready:
                    self._read_worker(handle)
                if handle.process.sentinel in ready:
                    self._reap(handle)

    # -- signals ---------------------------------------------------------------
    def _dispatch_signals(self) -> None:
        while self._signals:
            name = self._signals.pop(0)
            getattr(self, f"handle_{name[3:].lower()}")()

    def handle_term(self) -> None:
        log.info("stopping: finishing queries in flight")
        self.stop_event.set()

    handle_int = handle_term

    def handle_usr1(self) -> None:
        logs.reopen()
        for handle in self.workers.values():
            handle.post(control.ReopenLogs())
        log.info("log files reopened")

    def handle_hup(self) -> None:
        if self.reload_config is None:
            return
        try:
            config, applied, restart = self.reload_config()
        except ConfigError as e:
            log.error("reload refused, configuration kept: %s", e)
            return
        self.config = config
        logging.getLogger().setLevel(config.log_level.upper())
        self.health.configure(self._health_settings(config))
        try:
            self._serve_metrics()
        except ConfigError as e:
            log.error("%s", e)
        # Each worker applies the live settings it uses and says which values
        # it now uses (ConfigApplied): the log below is the supervisor's word,
        # the workers' answers are theirs.
        for handle in self.workers.values():
            handle.post(control.NewConfig(config))
        log.info("reloaded %s: applied %s%s", config.config_file, ", ".join(applied) or "nothing new",
                 f"; needs a restart: {', '.join(restart)}" if restart else "")
        self._check_applied("supervisor", {name: read(self) for name, read in SUPERVISOR_LIVE.items()},
                            {name: getattr(config, name) for name in SUPERVISOR_LIVE})

    # -- news from the registry and health threads -----------------------------------
    def _drain_events(self) -> None:
        changed = False
        while True:
            try:
                kind, payload = self.events.get_nowait()
            except queue.Empty:
                break
            changed |= self.on_event(kind, payload)
        if changed:
            self.publish()

    def on_event(self, kind: str, payload: Any) -> bool:
        """Apply one piece of news; True when the snapshot must change."""
        if kind == "records":
            self.loaded = True
            if not self.table.set_records(payload):
                return False
            self.health.set_backends(self.table.backends)
            return True
        if kind == "health":
            up, self.checked = payload
            return self.table.set_up(up)
        return False

    def publish(self) -> None:
        states = dict(self.health.states)
        snapshot = self.table.snapshot({b: s.latency for b, s in states.items() if s.latency is not None})
        self._wire = snapshot.to_wire()
        self._published_at = time.monotonic()
        self._send_routes(self.workers.values())
        log.info("routes version %d: %d routes, %d backends, %d down, %d invalid values",
                 snapshot.version, len(snapshot.routes), len(self.table.backends),
                 len(snapshot.down), len(self.table.invalid))

    def _send_routes(self, handles) -> None:
        if self.serving:
            for handle in handles:
                handle.post(control.NewSnapshot(self._wire))

    def _serve_when_ready(self) -> None:
        if self.serving:
            return
        checked = self.loaded and self.table.backends <= self.checked
        if not checked and time.monotonic() < self._serve_by:
            return
        self.serving = True
        self._published_at = time.monotonic()
        self._send_routes(self.workers.values())
        log.log(logging.INFO if checked else logging.WARNING, "serving routes version %d%s", self.table.version,
                "" if checked else f" without waiting longer for the registry and first checks "
                                   f"({FIRST_ROUTES_WAIT:g} s)")

    # -- metrics and the HTTP endpoint -------------------------------------------------
    def _serve_metrics(self) -> None:
        address = self.config.metrics_listen
        if address == self._metrics_address:
            return
        self.metrics.close()
        self._metrics_address = None  # what is served: nothing, until the new address is bound
        if address is not None:
            try:
                self.metrics.serve(address, self.routes, self.healthy, self.purge)
            except OSError as e:
                raise ConfigError(f"cannot serve metrics on {address}: {e.strerror or e}") from None
            self._metrics_address = address

    def _metrics_state(self) -> dict:
        return {"health": dict(self.health.states), "invalid": len(self.table.invalid),
                "version": self.table.version, "updated": self.table.updated,
                "routes": len(self.table.routes), "restarts": self.restarts,
                "workers": {i: h.pid for i, h in list(self.workers.items())},
                "fast_path": {i: h.fast_path for i, h in list(self.workers.items()) if h.fast_path is not None},
                "srtt": [h.srtt for h in list(self.workers.values())],
                "cache": [h.cache for h in list(self.workers.values())],
                "limits_networks": self.limits.tracked() if self.limits else 0,
                "rrl_accounts": self.rrl.tracked() if self.rrl else 0}

    def routes(self) -> dict:
        """The live table with each backend's health (``/routes``)."""
        states = dict(self.health.states)
        table = self.table
        default = self.config.forward_client_address
        return {
            "version": table.version, "updated": table.updated,
            "routes": [{"pattern": route.pattern, "backends": [
                {"address": str(b), "up": b in table.up,
                 "reason": states[b].reason if b in states else "not checked yet",
                 "check_latency": states[b].latency if b in states else None,
                 "client_address": mode}
                for b, mode in route.modes(default).items()]} for route in table.routes],
            "invalid": dict(table.invalid),
        }

    def purge(self, name: str, subtree: bool) -> dict:
        """``POST /purge``: every worker's cache forgets ``name`` (and what
        is below it, with ``subtree``) before it answers its next query."""
        try:
            wire_name = dns.name.from_text(name).canonicalize().to_wire()
        except dns.exception.DNSException as e:
            raise ValueError(f"{name!r} is not a domain name: {e}") from None
        assert wire_name is not None  # to_wire without a file returns the bytes
        sequence = self.purges.append(wire_name, subtree, "ctl")
        log.info("cache purge of %s%s (dnsrouterctl)", name, " and below" if subtree else "")
        return {"purged": name, "subtree": subtree, "sequence": sequence}

    def healthy(self) -> tuple[bool, str]:
        """Serving means: every worker slot has a live, ready worker, and routes are loaded."""
        missing = [i for i in range(self.config.server_workers)
                   if i not in self.workers or not self.workers[i].ready]
        if missing:
            return False, f"workers not serving: {missing}"
        if not self.loaded:
            return False, "no routes loaded from the registry yet"
        if not self.serving:
            return False, "waiting for the first health checks"
        behind = [i for i, h in sorted(self.workers.items()) if h.version != self.table.version]
        if behind and time.monotonic() - self._published_at > APPLY_WAIT:
            return False, f"workers not on routes version {self.table.version}: {behind}"
        return True, f"ok: {len(self.workers)} workers, routes version {self.table.version}"

    # -- workers -------------------------------------------------------------------
    def _read_worker(self, handle: workerset.WorkerHandle) -> None:
        try:
            while handle.conn.poll():
                message = handle.conn.recv()
                handle.last_seen = time.monotonic()
                self.metrics.add({("worker_messages", message.TAG): 1})
                self.on_worker_message(handle, message)
        except (EOFError, OSError):
            pass  # it died; the sentinel tells the loop

    def on_worker_message(self, handle: workerset.WorkerHandle, message: control.FromWorker) -> None:
        if isinstance(message, control.Ready):
            handle.ready = True
            handle.ready_at = time.monotonic()
            handle.version = message.version
        elif isinstance(message, control.Report):
            handle.version = message.version
            handle.srtt = message.srtt
            handle.fast_path = message.fast_path
            handle.cache = message.cache
            self.metrics.add(message.delta)
        elif isinstance(message, control.Evidence):
            for backend, streak in message.streaks.items():
                self.health.passive_failures(parse_address(backend), streak)
        elif isinstance(message, control.ConfigApplied):
            self._check_applied(f"worker {handle.spec.index}", message.effective, message.wanted)
        elif isinstance(message, control.BootFailed):
            raise BootError(message.reason)

    def _check_applied(self, who: str, effective: dict[str, Any], wanted: dict[str, Any]) -> None:
        """Log the live settings' values ``who`` (a worker, the supervisor)
        uses after a reload; one other than ``wanted`` was not applied."""
        log.info("%s uses %s", who, _describe(effective))
        for name, value in effective.items():
            if value != wanted[name]:
                log.error("%s did not apply %s: uses %s", who, _describe({name: wanted[name]}), value)

    def _reap(self, handle: workerset.WorkerHandle) -> None:
        handle.process.join(0)
        code = handle.process.exitcode
        if code is None:
            return
        index = handle.spec.index
        self._read_worker(handle)  # a last message (a boot failure) may be waiting
        handle.close()
        del self.workers[index]
        if self.stop_event.is_set():
            return
        if code == control.EXIT_BOOT_FAILED:
            raise BootError(f"worker {index} failed to start")
        if not handle.ready and self.restarts == 0 and index not in self._deaths:
            raise BootError(f"worker {index} exited with code {code} during start-up")
        self.restarts += 1
        now = time.monotonic()
        # A worker that served a while and died (killed, a rare crash) is
        # replaced at once, however often that happens: its socket is getting
        # queries. Only workers that die young, again and again, are a crash
        # loop: they wait longer each time, up to a few seconds, not a storm.
        young = not handle.ready or now - handle.ready_at < YOUNG
        deaths = [t for t in self._deaths.get(index, []) if now - t < 60] + [now] if young else []
        self._deaths[index] = deaths
        delay = 0.0 if len(deaths) <= 1 else min(0.1 * 2 ** (len(deaths) - 2), RESPAWN_BACKOFF_MAX)
        log.warning("worker %d (pid %s) exited with code %s; replacing it%s", index, handle.pid, code,
                    f" in {delay:.1f}s" if delay else "")
        self._respawn_at[index] = now + delay

    def _check_heartbeats(self) -> None:
        """A worker silent for too long (stopped, wedged) is killed and replaced.

        SIGKILL at once: a stopped process would not act on SIGTERM, and a
        wedged one holds nothing that needs a clean exit.
        """
        now = time.monotonic()
        limit = self.config.server_heartbeat_timeout
        for handle in self.workers.values():
            if handle.ready and now - handle.last_seen > limit and handle.process.is_alive():
                log.warning("worker %d (pid %s) silent for %.1fs; killing it", handle.spec.index,
                            handle.pid, now - handle.last_seen)
                handle.process.kill()
                handle.last_seen = now  # once; the sentinel brings the respawn

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for index, when in list(self._respawn_at.items()):
            if when <= now:
                del self._respawn_at[index]
                self.spawn(index)

    # -- stop ------------------------------------------------------------------------
    def shutdown(self) -> int:
        for handle in self.workers.values():
            handle.post(control.Stop())
        deadline = time.monotonic() + 2 * self.config.forward_timeout + 3
        while self.workers and time.monotonic() < deadline:
            handles = list(self.workers.values())
            ready = wait([h.process.sentinel for h in handles] + [h.conn for h in handles], timeout=0.1)
            for handle in handles:
                if handle.conn in ready:
                    self._read_worker(handle)
                if handle.process.sentinel in ready:
                    self._reap(handle)
        self.kill_all()
        self.health.stop()
        if self._pidfile:
            try:
                os.unlink(self._pidfile)
            except OSError:
                pass  # we may no longer have the rights for its directory
        log.info("stopped")
        return 0

    def kill_all(self) -> None:
        self.stop_event.set()
        for handle in list(self.workers.values()):
            if handle.process.is_alive():
                handle.process.kill()
            handle.process.join(2)
            handle.close()
        self.workers.clear()


# The live settings the supervisor applies itself (handle_hup), and how to
# read back the value it uses; the workers apply theirs (workers/live.py).
# tests/test_live_settings.py: these and the workers' are exactly the live ones.
SUPERVISOR_LIVE: dict[str, Callable[[Supervisor], Any]] = {
    "health_interval": lambda s: s.health.settings.interval,
    "health_timeout": lambda s: s.health.settings.timeout,
    "health_fall": lambda s: s.health.settings.fall,
    "health_rise": lambda s: s.health.settings.rise,
    "metrics_listen": lambda s: s._metrics_address,
    "log_level": lambda s: logging.getLevelName(logging.getLogger().level).lower(),
}
