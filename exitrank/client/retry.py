"""When a failed call is tried again, and how long the client waits in between.

Only UNAVAILABLE is retried: it means the request never reached a server that could act on it
(connection refused or reset, the server draining at shutdown, the ranker unable to reach the
retriever). Every other code is an answer about the request itself, and repeating it cannot help;
RESOURCE_EXHAUSTED in particular is the server shedding load, and retrying it would add load.

Waits grow exponentially with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter",
2015): the k-th retry sleeps ``uniform(0, min(max_backoff_s, initial_backoff_s * multiplier**(k-1)))``,
so clients that failed together do not come back together. A retry never starts when its wait
would outlast the call's deadline: the deadline covers every attempt, not each one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How many times, and with which waits, an UNAVAILABLE call is tried again.

    Args:
        retries: attempts after the first (0: never retry). Default 3.
        initial_backoff_s: the cap of the first wait. Default 0.05 s.
        max_backoff_s: the largest cap of any wait. Default 2 s.
        multiplier: how much the cap grows per retry. Default 2.
        rng: the jitter source (seed it for reproducible waits).

    Raises:
        ValueError: a negative count or a non-positive wait, naming the setting.
    """

    retries: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("initial_backoff_s must be > 0 and <= max_backoff_s, got "
                             f"{self.initial_backoff_s} and {self.max_backoff_s}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")

    def backoff_cap(self, retry: int) -> float:
        """The largest wait before the ``retry``-th retry (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))

    def next_delay(self, code: grpc.StatusCode, attempts: int, remaining_s: float) -> float | None:
        """Seconds to wait before another attempt, or None when the failure is final.

        ``attempts`` is how many were made so far and ``remaining_s`` what is left of the deadline.
        """
        if code not in RETRYABLE or attempts > self.retries:
            return None
        delay = self.rng.uniform(0.0, self.backoff_cap(attempts))
        return delay if delay < remaining_s else None

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC channel arguments that make a broken connection reconnect on the same schedule.

        Without them, the channel's own reconnect backoff (1 s, then growing to 120 s) leaves it in
        TRANSIENT_FAILURE while the retries run, and every retry fails at once.
        """
        initial_ms = max(1, int(self.initial_backoff_s * 1000))
        return [
            ("grpc.initial_reconnect_backoff_ms", initial_ms),
            ("grpc.min_reconnect_backoff_ms", initial_ms),
            ("grpc.max_reconnect_backoff_ms", max(initial_ms, int(self.max_backoff_s * 1000))),
        ]
