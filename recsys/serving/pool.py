"""`ScoringPool`: bounded admission, a thread pool and a deadline for blocking scoring calls.

Admission is a semaphore taken without blocking: when `max_in_flight` calls are running or
waiting for a thread, the next one fails at once with `Overloaded` instead of joining a queue
that could grow without end. Calls run in threads so the event loop stays free (health checks,
rejections). A call that passes its deadline raises `DeadlineExceeded` to its caller, but its slot
is released only when its thread actually finishes: abandoned work still counts against the
bound, so timeouts cannot let more work in than the machine was sized for.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

from prometheus_client import Gauge

T = TypeVar("T")


class Overloaded(Exception):
    """No free slot (or the pool is closed): answer 503."""


class DeadlineExceeded(Exception):
    """The call did not finish within the deadline: answer 504."""


class ScoringPool:
    def __init__(self, threads: int, max_in_flight: int, timeout_s: float, in_flight: Gauge | None = None):
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="muse-score")
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._in_flight = in_flight
        self._closed = False

    @property
    def accepting(self) -> bool:
        return not self._closed

    async def run(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` in a scoring thread; Overloaded / DeadlineExceeded as described above."""
        if self._closed or not self._slots.acquire(blocking=False):
            raise Overloaded
        if self._in_flight is not None:
            self._in_flight.inc()
        try:
            future = self._executor.submit(fn, *args)
        except RuntimeError:  # the executor was shut down between the check and the submit
            self._release(None)
            raise Overloaded from None
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            raise DeadlineExceeded from None

    def call(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on a scoring thread, waited for here: no admission, no deadline (model loads).

        All torch work of a service belongs on its scoring threads. Each thread that runs torch's
        parallel code keeps an OpenMP thread team for as long as it lives, and once the teams hold
        more threads than there are cores, OpenMP stops spinning between parallel regions and
        parks its threads instead: after one model load in another thread, a 100,000 x 100
        ranking went from 25 to 38 ms on 2 cores (measured).
        """
        return self._executor.submit(fn, *args).result()

    def _release(self, _: Future | None) -> None:
        if self._in_flight is not None:
            self._in_flight.dec()
        self._slots.release()

    def close(self) -> None:
        """Refuse new calls and drop queued ones (their slots are released by cancellation)."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
