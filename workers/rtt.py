"""Each backend's round-trip time, smoothed as TCP does (RFC 6298).

The early retry waits SRTT + 4 x RTTVAR: long enough that a backend
answering as usual is not asked twice, short enough that a query lost or
sent to a dead backend is answered elsewhere before a resolver gives up.
"""
from __future__ import annotations

ALPHA, BETA, K = 1 / 8, 1 / 4, 4  # RFC 6298, section 2


class Rtt:
    """One backend's estimate. Updated from several upstream threads without
    a lock: a sample lost to a race changes an average by a few percent."""

    __slots__ = ("srtt", "rttvar")

    def __init__(self, first: float) -> None:
        self.srtt = first
        self.rttvar = first / 2

    def sample(self, rtt: float) -> None:
        self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt)
        self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt

    def timeout(self, low: float, high: float) -> float:
        """SRTT + K x RTTVAR, within [low, high]."""
        return min(max(self.srtt + K * self.rttvar, low), high)
