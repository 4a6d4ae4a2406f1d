"""urllib3's retry and timeout bound to one overall deadline, for the jobs website client.

The classes are built on first use, so that importing the client does not import urllib3.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

MAX_BACKOFF = 10.0


def _remaining(deadline: float | None) -> float:
    return math.inf if deadline is None else deadline - time.monotonic()


@functools.cache
def _deadline_classes() -> tuple[type, type]:
    """Build (lazily, so importing this module stays cheap) urllib3 classes bound to a deadline."""
    from urllib3.util.retry import Retry
    from urllib3.util.timeout import Timeout

    class DeadlineRetry(Retry):
        # urllib3 retries inside one requests call, out of our sight; only the Retry object
        # itself can stop it at the overall deadline and keep its sleeps inside it.
        deadline: float | None = None

        def new(self, **kw: Any) -> DeadlineRetry:
            retry = super().new(**kw)
            retry.deadline = self.deadline
            return retry

        def is_exhausted(self) -> bool:
            return super().is_exhausted() or _remaining(self.deadline) <= 0

        def get_backoff_time(self) -> float:
            backoff = min(super().get_backoff_time(), MAX_BACKOFF)
            return max(0.0, min(backoff, _remaining(self.deadline)))

        def get_retry_after(self, response: Any) -> float | None:
            after = super().get_retry_after(response)
            return None if after is None else max(0.0, min(after, _remaining(self.deadline)))

    class DeadlineTimeout(Timeout):
        # urllib3 reads these properties afresh for every attempt, including its own retries,
        # so each socket wait shrinks to the time left before the deadline.
        deadline: float | None = None

        def clone(self) -> DeadlineTimeout:
            timeout = DeadlineTimeout(connect=self._connect, read=self._read, total=self.total)
            timeout.deadline = self.deadline
            return timeout

        def _cap(self, value: Any) -> Any:
            left = _remaining(self.deadline)
            if left == math.inf:
                return value
            # never 0: a zero socket timeout means non-blocking, not "time out now"
            left = max(left, 0.001)
            return left if not isinstance(value, (int, float)) else min(value, left)

        @property
        def connect_timeout(self) -> Any:
            return self._cap(super().connect_timeout)

        @property
        def read_timeout(self) -> Any:
            return self._cap(super().read_timeout)

    return DeadlineRetry, DeadlineTimeout
