from __future__ import annotations

from agent.ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_average_rate_stays_under_the_cap() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1000, clock=clock, sleep=clock.sleep)
    for _ in range(50):
        limiter.acquire(100)  # 5000 bytes in total
    # one second's burst is free, the other 4000 bytes take 4 s at 1000 B/s
    assert 3.9 <= clock.now <= 4.1


def test_zero_means_unlimited() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0, clock=clock, sleep=clock.sleep)
    limiter.acquire(10**9)
    assert clock.now == 0.0
