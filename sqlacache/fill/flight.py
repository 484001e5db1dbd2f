"""Single flight: concurrent misses of one key in this process run the query once.

The first reader to miss a key leads; the others wait (threads on an event, asyncio tasks on a
future of their own loop) until the leader has stored its result or ``timeout`` passes, then look
the key up again. They never take the leader's rows directly: a commit may have happened after the
leader's query began, and the lookup is what checks that.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

from sqlacache._lru import LRU
from sqlacache._sa import await_, in_greenlet


class Flight:
    __slots__ = ("_done", "_lock", "_waiters", "owner")

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def wait(self, timeout: float) -> bool:
        """Block this thread, or this task when called in an AsyncSession's greenlet; True if done."""
        if self._done.is_set():
            return True
        if not in_greenlet():
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return self._done.wait(timeout)
            # Sync code on an event loop's thread: blocking here would stop the loop the leader
            # may be running on. Don't wait.
            return self._done.is_set()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._done.is_set():
                return True
            self._waiters.append((loop, future))
        try:
            await_(asyncio.wait_for(future, timeout))
        except asyncio.TimeoutError:
            return False
        return True

    def finish(self) -> None:
        with self._lock:
            self._done.set()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there any more
                loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _me() -> Any:
    """Who is asking: the running task inside a greenlet (tasks share a thread), else the thread."""
    if in_greenlet():
        try:
            return asyncio.current_task()
        except RuntimeError:
            pass
    return threading.get_ident()


class Flights:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flying: dict[str, Flight] = {}
        # key → when its last flight landed: a reader whose lookup began before that may have
        # missed what the flight stored, and should look again before leading another.
        self._landed: LRU[str, float] = LRU(4096)

    def join(self, key: str, since: float = 0.0) -> tuple[Flight, bool, bool]:
        """The flight for ``key``, whether the caller leads it (then it must ``land`` it), and —
        for a leader — whether a flight landed after ``since`` (time.monotonic())."""
        me = _me()
        with self._lock:
            flight = self._flying.get(key)
            if flight is not None and flight.owner != me:
                return flight, False, False
            # A leader reading its own key again (a nested load) leads again rather than wait on itself.
            flight = self._flying[key] = Flight(me)
            landed = self._landed.get(key)
            return flight, True, landed is not None and landed >= since

    def try_lead(self, key: str, since: float) -> Flight | None:
        """Lead ``key`` if nobody does and no flight landed after ``since`` (refresh-ahead: the
        others are served meanwhile, and a refresh that just landed is not done again), else None."""
        with self._lock:
            landed = self._landed.get(key)
            if key in self._flying or (landed is not None and landed >= since):
                return None
            flight = self._flying[key] = Flight(_me())
            return flight

    def land(self, key: str, flight: Flight) -> None:
        with self._lock:
            if self._flying.get(key) is flight:
                del self._flying[key]
                self._landed.put(key, time.monotonic())
        flight.finish()
