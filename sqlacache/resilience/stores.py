"""Background stores: a miss's result stored off the reader's path, by a thread or the event loop."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from sqlacache.resilience.stats import Counters


class StoreJob(NamedTuple):
    """A result to store: see ``Backend.store``; ``lease`` is the filler's (released by the store)."""

    key: str
    payload: bytes
    deps: Sequence[str]
    generation: int
    ttl: float
    lease: str | None = None
    refresh_ahead: float = 0.0
    shape: str = ""  # the statement shape's digest (security/limits.py counts entries per shape)


class BackgroundStores:
    """A bounded queue of stores and the thread that makes them; tasks the event loop runs for them."""

    def __init__(
        self,
        store: Callable[[StoreJob], bool],
        count: Counters,
        internal_error: Callable[[str, BaseException], None],
    ) -> None:
        self.store = store
        self.count = count
        self.internal_error = internal_error
        self._lock = threading.Lock()
        self._queue: queue.Queue[StoreJob | None] = queue.Queue(1024)
        self._worker: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a background task alive until it is done (``await_all`` waits for them)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def put(self, job: StoreJob) -> None:
        if self._worker is None:
            with self._lock:
                if self._worker is None:
                    self._worker = threading.Thread(target=self._run, name="sqlacache-stores", daemon=True)
                    self._worker.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.count("stores_dropped")  # a dropped store is only a later miss (its lease expires)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.store(item)
            except Exception as exc:  # the worker must outlive any one store
                self.internal_error("in a background store", exc)
            finally:
                self._queue.task_done()

    def wait(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.001)

    async def await_all(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self._queue.unfinished_tasks:  # the worker thread's: waited for off the event loop
            await asyncio.to_thread(self.wait, max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self._worker is not None:
            self.wait()
            self._queue.put(None)
            self._worker.join(5)
            self._worker = None
