"""Failed authentications per peer address: a sliding minute, so a peer guessing tokens is slowed
to a few guesses a minute (answered 429) while every other peer is served as usual."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW = 60.0
MAX_PEERS = 4096  # peers remembered at once; the oldest go first (a flood of addresses cannot grow it)


class AuthThrottle:
    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, peer: str) -> float | None:
        """Seconds until ``peer`` may try again, or None when it is not throttled."""
        with self._lock:
            seen = self._recent(peer)
            if seen is None or len(seen) < self.limit:
                return None
            return max(seen[0] + WINDOW - self._clock(), 1.0)

    def failed(self, peer: str) -> int:
        """Record a failed authentication; how many ``peer`` has had in the last minute."""
        with self._lock:
            seen = self._recent(peer)
            if seen is None:
                if len(self._failures) >= MAX_PEERS:
                    del self._failures[next(iter(self._failures))]
                seen = self._failures[peer] = deque(maxlen=self.limit)
            seen.append(self._clock())
            return len(seen)

    def _recent(self, peer: str) -> deque[float] | None:
        seen = self._failures.get(peer)
        if seen is None:
            return None
        while seen and seen[0] <= self._clock() - WINDOW:
            seen.popleft()
        if not seen:
            del self._failures[peer]
            return None
        return seen
