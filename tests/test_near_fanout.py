"""The near-cache between real processes: another process's commit is seen once its ``commit()``
returned, whether the fan-out has reached this process yet or not.

In the other modules "another process" is another ``Cache`` in the test's process (``make_cache``).
Such caches all watch the same database, so a commit through one of them evicts the near-cache of
every other one right in the committing thread (``Internal.bump`` of each watcher): the fan-out is
never what makes those reads fresh. Here the other process is a real one (tests/near_worker.py,
with a near-cache of its own), so Redis — its versions and its fan-out — is the only way between
the two. Near worlds only (conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import NEAR_SYNC_WORLDS, World
from tests.helpers import near_settled, seed, until
from tests.models import User

pytestmark = pytest.mark.parametrize("world", NEAR_SYNC_WORLDS, indirect=True)

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    def __init__(self, world: World, request: pytest.FixtureRequest) -> None:
        url = world.engine.url.render_as_string(hide_password=False)
        schema = request.getfixturevalue("pg_schema") if world.dialect == "postgresql" else "-"
        redis_url = request.getfixturevalue("redis_url")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.near_worker", url, schema, redis_url, world.cache.prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )

    def __call__(self, op: str, **kw: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the worker died (exit code {self.proc.wait(10)})"
        return json.loads(line)["out"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(20)


@pytest.fixture
def worker(world: World, request: pytest.FixtureRequest) -> Iterator[Worker]:
    seed(world)
    w = Worker(world, request)
    yield w
    w.close()


def name_of(s: Any, uid: int = 1) -> str:
    return str(s.get(User, uid).name)


def names(s: Any) -> list[str]:
    return [u.name for u in s.scalars(select(User).order_by(User.id))]


def _in_memory(world: World, read: Any) -> Any:
    """``read`` until the near-cache serves it (the first may miss, the next comes from Redis)."""
    near_settled(world.cache)
    for _ in range(3):
        hits = world.cache.stats()["near_hits"]
        with world.Session() as s:
            value = read(s)
        if world.cache.stats()["near_hits"] > hits:
            return value
    raise AssertionError("never served from process memory")


def test_commits_of_another_process_are_seen_when_they_return(world: World, worker: Worker) -> None:
    for i in range(12):
        # Both reads in this process's memory; the other process writes (ORM or Core) and commits.
        _in_memory(world, name_of)
        _in_memory(world, names)
        worker("rename" if i % 2 else "core", id=1, name=f"w{i}")
        with world.Session() as s:
            assert name_of(s) == f"w{i}"
            assert names(s)[0] == f"w{i}"
        # And the other way round: this process commits, the other process's memory must not answer.
        worker("settle")
        for _ in range(3):
            assert worker("name", id=1) == f"w{i}"
            assert worker("names")[0] == f"w{i}"
        with world.Session() as s:
            s.get(User, 1).name = f"p{i}"
            s.commit()
        assert worker("name", id=1) == f"p{i}"
        assert worker("names")[0] == f"p{i}"
    assert worker("stats")["near_hits"] > 0


def _hold_fanout(world: World) -> threading.Event:
    """Hold this process's fan-out subscriber at its next message, until the event is set (a slow
    network, a busy subscriber thread)."""
    near = world.cache.near
    assert near is not None
    release = threading.Event()
    apply = near.apply

    def held(deps: frozenset[str]) -> None:
        release.wait(30)
        apply(deps)

    near.apply = held  # type: ignore[method-assign]
    return release


def test_an_eviction_applied_while_the_position_is_read(world: World) -> None:
    """The race the real processes above found: the reader took the entry from memory, then read the
    position; meanwhile the subscriber applied the other process's bump (evicting that entry) and
    so was caught up with the position — the entry in hand must not be served (read/near.py)."""
    seed(world)
    _in_memory(world, name_of)
    other = world.make_cache()  # its invalidate() reaches this cache only through Redis
    release = _hold_fanout(world)
    io = world.cache.io
    position = io.position
    subscription = world.cache.near.subscription  # type: ignore[union-attr]

    def position_after_the_fanout() -> Any:
        release.set()
        at = position()
        assert until(lambda: subscription.caught_up(at))
        return at

    try:
        raw = world.engine.raw_connection()  # a write no cache of this process sees
        try:
            raw.cursor().execute("UPDATE users SET name = 'raced' WHERE id = 1")
            raw.commit()
        finally:
            raw.close()
        other.invalidate(User, pks=[1])  # the other process's eviction: returned
        io.position = position_after_the_fanout  # type: ignore[method-assign]
        with world.Session() as s:
            assert name_of(s) == "raced"
    finally:
        release.set()
        vars(io).pop("position", None)
        other.close()


def test_a_late_fanout_never_makes_a_new_transaction_stale(world: World, worker: Worker) -> None:
    """Strict: a transaction that begins after the other process's commit returned never gets what
    that commit evicted from memory, however late the fan-out message arrives."""
    _in_memory(world, name_of)
    _in_memory(world, names)
    release = _hold_fanout(world)
    try:
        worker("rename", id=1, name="late")
        for _ in range(3):
            with world.Session() as s:
                assert name_of(s) == "late"
                assert names(s)[0] == "late"
    finally:
        release.set()
    subscription = world.cache.near.subscription  # type: ignore[union-attr]
    assert until(lambda: subscription.caught_up(world.cache.backend.position()))  # type: ignore[attr-defined]
    _in_memory(world, name_of)


def test_what_a_transaction_that_read_from_memory_sees_of_a_later_commit(
    world: World, worker: Worker
) -> None:
    """Strict coherence, as the README states it: the position is read at a transaction's first read
    from memory. A commit in another process that returns after that is seen by this transaction
    once its fan-out message is applied here (until then it reads the value as of its position);
    a transaction that begins after the commit returned sees it at once."""
    _in_memory(world, lambda s: name_of(s, 2))
    _in_memory(world, name_of)
    release = _hold_fanout(world)
    try:
        with world.Session() as s:
            hits = world.cache.stats()["near_hits"]
            assert name_of(s, 2) == "u2"  # from memory: the transaction's position is read here
            assert world.cache.stats()["near_hits"] == hits + 1
            worker("rename", id=1, name="late")  # returned: committed and evicted in Redis
            assert name_of(s) == "u1"  # the message is held back: the value as of the position
            with world.Session() as fresh:  # begins after the commit returned
                assert name_of(fresh) == "late"
            release.set()
            deadline = time.monotonic() + 5
            while name_of(s) != "late":  # once the message is applied
                assert time.monotonic() < deadline, "the fan-out message never evicted the entry"
                time.sleep(0.01)
    finally:
        release.set()
