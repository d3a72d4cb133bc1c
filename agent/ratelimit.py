"""A token bucket that caps download bandwidth, so an update never saturates a site's link."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    """Blocks callers so that at most `bytes_per_s` pass per second on average.

    The bucket holds up to one second's worth, so short bursts go at full speed while the
    average stays under the cap. 0 means unlimited.
    """

    def __init__(
        self,
        bytes_per_s: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = max(0, bytes_per_s)
        self._clock, self._sleep = clock, sleep
        self._tokens = float(self.rate)
        self._stamp = clock()
        self._lock = threading.Lock()

    def acquire(self, amount: int) -> None:
        if self.rate == 0 or amount <= 0:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= amount
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
