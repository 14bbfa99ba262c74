"""What the etcd registries do while etcd does not answer.

Both (v2 and v3) keep the table they have, so routes stay up, and try the
next endpoint at once; only when every endpoint has failed in a row do they
pause, for a doubling, capped and jittered time (so that many routers do not
hammer a recovering etcd in step), and only the first such pause of an
outage is logged, with its end.
"""
from __future__ import annotations

import logging
import random
import threading
from typing import Sequence


class Outage:
    def __init__(self, urls: Sequence[str], min_backoff: float, max_backoff: float,
                 log: logging.Logger) -> None:
        self.urls = list(urls)
        self._min, self._max = min_backoff, max_backoff
        self._log = log
        self._backoff = min_backoff
        self._failed_in_round = 0  # endpoints that failed since the last success or pause
        self.active = False  # logged as begun, not yet as over

    def over(self, current: int) -> None:
        """etcd at ``urls[current]`` answered."""
        if self.active:
            self._log.info("etcd reachable again at %s", self.urls[current])
        self.active, self._failed_in_round, self._backoff = False, 0, self._min

    def failed(self, current: int, reason: str, kept: int, stop: threading.Event) -> int:
        """``urls[current]`` failed; the endpoint to try next (after a pause
        once every endpoint failed in a row)."""
        current = (current + 1) % len(self.urls)
        self._failed_in_round += 1
        if self._failed_in_round < len(self.urls):
            return current
        self._failed_in_round = 0
        if not self.active:
            self._log.warning("etcd unusable at %s: %s; keeping the last %d records, retrying",
                              ", ".join(self.urls), reason, kept)
            self.active = True
        stop.wait(random.uniform(self._backoff / 2, self._backoff))
        self._backoff = min(self._backoff * 2, self._max)
        return current
