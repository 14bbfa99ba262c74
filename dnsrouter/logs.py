"""Logging for the supervisor and the workers: one line per event.

The target is stderr, syslog, or a file. Files are opened with
WatchedFileHandler, so a rotated file is reopened by itself; SIGUSR1
reopens it at once (for rotation tools that copy and truncate, or signal).
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys


def setup(target: str, level: str, role: str) -> None:
    """Send the root logger to ``target``; ``role`` tags each line."""
    if target == "syslog":
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address="/dev/log" if os.path.exists("/dev/log") else ("localhost", 514),
            facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        fmt = f"dnsrouter[{os.getpid()}]: {role} %(levelname)s %(message)s"
    elif target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        fmt = f"%(asctime)s dnsrouter[{role}] %(levelname)s %(message)s"
    else:
        handler = logging.handlers.WatchedFileHandler(target)
        fmt = f"%(asctime)s dnsrouter[{role}] %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())


def reopen() -> None:
    """Reopen log files (SIGUSR1)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
            finally:
                handler.release()
