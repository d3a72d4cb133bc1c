"""Capped exponential backoff with full jitter (AWS architecture blog's "full jitter")."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays for retrying a failing operation: uniform in [0, min(cap, base * 2**n)].

    Full jitter spreads a fleet's retries so that a cloud coming back is not hit by every
    device at the same instant.
    """

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2.0**self.attempt))
        self.attempt += 1
        return self.rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
