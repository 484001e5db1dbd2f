"""Where a cached read's time goes: a ``session.get`` hit and miss (sync and asyncio) taken apart,
next to the physical floor of each, measured in the same run (issue 11: "where a target cannot be
reached, show the profile that proves what the remaining time is spent on and how far it is from the
physical limit").

    .venv/bin/python benchmarks/bench_anatomy.py [--iterations N] [--output FILE.md]

Each timed read opens a ``CachingSession`` (then, in a second part, a ``CachingAsyncSession`` on
asyncpg and the asyncio Redis client), calls ``get`` and closes the session. The pieces are
timed by wrapping the read path's own functions for the run (``plan_get``, the backend round trip,
decode + attach, the statement, the store's send), so the pieces add up to the read; what is left
is the glue between them. The floor's parts are measured alone: a ``PING`` round trip to the same
Redis, the lookup script's server time (``INFO commandstats`` of a Redis this script starts for
itself, so no other client is counted), and a plain ``Session`` doing the same ``get``.

It needs PostgreSQL (``SQLACACHE_BENCH_PG_URL``, default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``,
and ``SQLACACHE_BENCH_PG_ASYNC_URL``, default the same database with asyncpg; a private schema, dropped
at the end) and the ``redis-server`` binary (a throwaway server on a free
port, shut down at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio
from sqlalchemy import String, create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sqlacache.read.execute as execute_mod
import sqlacache.read.get as get_mod
import sqlacache.read.near as near_mod
import sqlacache.session as session_mod
from sqlacache import Cache, CachingAsyncSession, CachingSession
from sqlacache.resilience.resilient import Resilient
from tests.faults import RedisServer

PG_URL = os.environ.get("SQLACACHE_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_ASYNC_URL = os.environ.get(
    "SQLACACHE_BENCH_PG_ASYNC_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
ROWS = 1000


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "anatomy_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    email: Mapped[str] = mapped_column(String(100))
    score: Mapped[int]


@contextmanager
def throwaway_redis() -> Iterator[redis.Redis]:
    server = RedisServer()  # the fault harness's: a free port, its own dir, no persistence
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=1)
    try:
        yield client
    finally:
        client.close()
        server.close()


class Pieces:
    """Wraps the read path's functions for the run and collects each one's time per read."""

    def __init__(self) -> None:
        self.now: dict[str, int] = {}
        self.undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                return original(*args, **kwargs)
            finally:
                self.now[label] = self.now.get(label, 0) + time.perf_counter_ns() - t0

        setattr(owner, name, timed)
        self.undo.append(lambda: setattr(owner, name, original))

    def awrap(self, owner: Any, name: str, label: str) -> None:
        """``wrap`` for a coroutine function (its time includes its waits on the loop)."""
        original = getattr(owner, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                return await original(*args, **kwargs)
            finally:
                self.now[label] = self.now.get(label, 0) + time.perf_counter_ns() - t0

        setattr(owner, name, timed)
        self.undo.append(lambda: setattr(owner, name, original))

    def take(self) -> dict[str, int]:
        out, self.now = self.now, {}
        return out

    def restore(self) -> None:
        for undo in reversed(self.undo):
            undo()


def median_us(values: list[int]) -> float:
    return statistics.median(values) / 1000 if values else 0.0


def server_usec(client: redis.Redis, command: str) -> tuple[int, int]:
    stat = client.info("commandstats").get(f"cmdstat_{command}", {"calls": 0, "usec": 0})
    return int(stat["calls"]), int(stat["usec"])


def table(
    title: str,
    total: list[int],
    parts: dict[str, list[int]],
    floor: list[tuple[str, float]],
    inside: tuple[str, float] | None = None,
) -> list[str]:
    rows = [f"### {title}", "", "| piece | median µs |", "|---|---:|"]
    accounted = 0.0
    if inside is not None:  # what the read does anyway, measured alone (its pieces are in it)
        parts = {k: v for k, v in parts.items() if k != "the SELECT (statement)"}
        accounted += inside[1]
        rows.append(f"| {inside[0]} | {inside[1]:.1f} |")
    for name, values in parts.items():
        m = median_us(values)
        accounted += m
        rows.append(f"| {name} | {m:.1f} |")
    whole = median_us(total)
    rows.append(f"| glue between the pieces (the rest) | {whole - accounted:.1f} |")
    rows.append(f"| **the read, end to end** | **{whole:.1f}** |")
    rows += ["", "| the physical floor, measured alone | median µs |", "|---|---:|"]
    low = 0.0
    for name, value in floor:
        low += value
        rows.append(f"| {name} | {value:.1f} |")
    rows.append(f"| **floor** | **{low:.1f}** |")
    rows.append(f"\nThe read costs {whole / low:.2f} times its floor ({whole - low:+.1f} µs).\n")
    return rows


@dataclass
class Samples:
    """One kind of session's measurements: the floor's parts, the reads, and their pieces."""

    ping: list[int] = field(default_factory=list)
    plain_get: list[int] = field(default_factory=list)
    session_only: list[int] = field(default_factory=list)
    hit_total: list[int] = field(default_factory=list)
    miss_total: list[int] = field(default_factory=list)
    hit_parts: dict[str, list[int]] = field(default_factory=dict)
    miss_parts: dict[str, list[int]] = field(default_factory=dict)


def hit_and_miss(
    m: Samples, suffix: str, session: str, plain: str, ping: str, hit_server: float
) -> list[str]:
    """The two tables of one kind of session: a hit and a miss, each next to its floor."""
    rt = median_us(m.ping)
    lines = table(
        f"A hit{suffix}",
        m.hit_total,
        {f"{session} + close (measured alone)": m.session_only, **m.hit_parts},
        [
            (f"a Redis round trip ({ping})", rt),
            ("the lookup script's server time", hit_server),
            (f"{session} + close, no read", median_us(m.session_only)),
        ],
    )
    lines += table(
        f"A miss{suffix}",
        m.miss_total,
        m.miss_parts,
        [
            (f"a plain {plain}'s get (one SELECT), open to close", median_us(m.plain_get)),
            (f"a Redis round trip ({ping})", rt),
        ],
        inside=(f"the get as a plain {plain} does it (measured alone)", median_us(m.plain_get)),
    )
    return lines


def run(iterations: int) -> str:
    schema = f"sqlacache_anatomy_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_engine(PG_URL, execution_options={"schema_translate_map": {None: schema}})
    out: list[str] = []
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                User.__table__.insert(),
                [
                    {"id": i, "name": f"user {i}", "email": f"u{i}@example.com", "score": i}
                    for i in range(1, 1 + ROWS)
                ],
            )
        with throwaway_redis() as client:
            port = client.connection_pool.connection_kwargs["port"]
            cache = Cache(backend=f"redis://127.0.0.1:{port}/0", prefix="anatomy")
            caching = sessionmaker(engine, class_=CachingSession, cache=cache)
            plain = sessionmaker(engine)
            out = measure(client, cache, caching, plain, iterations)
            cache.close()
            out += asyncio.run(ameasure(client, f"redis://127.0.0.1:{port}/0", schema, iterations))
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    return "\n".join(out)


def measure(
    client: redis.Redis, cache: Cache, caching: Callable[[], Session], plain: Callable[[], Session], n: int
) -> list[str]:
    def uid(i: int) -> int:
        return i % ROWS + 1

    for i in range(ROWS):  # every row cached
        with caching() as s:
            s.get(User, uid(i))
    cache.io.wait_for_stores()

    pieces = Pieces()
    pieces.wrap(get_mod, "plan_get", "plan (key, policy)")
    pieces.wrap(Resilient, "lease", "lookup round trip")
    pieces.wrap(get_mod, "_decode_get", "decode + attach")
    pieces.wrap(execute_mod, "invoke", "the SELECT (statement)")
    pieces.wrap(Resilient, "_send_store", "store sent (not awaited)")

    m = Samples()

    def timed(fn: Callable[[], Any]) -> int:
        t0 = time.perf_counter_ns()
        fn()
        return time.perf_counter_ns() - t0

    def get_with(factory: Callable[[], Session], i: int) -> Callable[[], Any]:
        def go() -> Any:
            with factory() as s:
                return s.get(User, i)

        return go

    def open_close() -> None:
        with caching():
            pass

    lookup_calls = lookup_usec = 0
    store_calls = store_usec = 0
    for r in range(n):
        i = uid(r)
        m.ping.append(timed(client.ping))
        m.plain_get.append(timed(get_with(plain, i)))
        m.session_only.append(timed(open_close))

        pieces.take()
        c0, u0 = server_usec(client, "evalsha")
        m.hit_total.append(timed(get_with(caching, i)))
        c1, u1 = server_usec(client, "evalsha")
        lookup_calls, lookup_usec = lookup_calls + c1 - c0, lookup_usec + u1 - u0
        for k, v in pieces.take().items():
            m.hit_parts.setdefault(k, []).append(v)

        cache.invalidate(User, pks=[i])
        cache.io.settle_stores()
        pieces.take()
        c0, u0 = server_usec(client, "evalsha")
        m.miss_total.append(timed(get_with(caching, i)))
        for k, v in pieces.take().items():
            m.miss_parts.setdefault(k, []).append(v)
        cache.io.settle_stores()  # the store's reply, outside the timed region
        c1, u1 = server_usec(client, "evalsha")
        store_calls, store_usec = store_calls + c1 - c0, store_usec + u1 - u0
    pieces.restore()
    stats = cache.stats()

    hit_server = lookup_usec / max(1, lookup_calls)
    miss_server = store_usec / max(1, store_calls)

    lines = [
        "## Anatomy of a cached `session.get` (sync, PostgreSQL + Redis on loopback)",
        "",
        f"{n} hits and {n} misses, interleaved with the floor's measurements; Python "
        f"{sys.version.split()[0]}, load average {os.getloadavg()[0]:.2f}. Redis server time per EVALSHA: "
        f"{hit_server:.1f} µs on a hit (the lookup script), {miss_server:.1f} µs per script on a miss "
        "(the lookup that takes the lease, then the store).",
        "",
    ]
    lines += hit_and_miss(m, "", "CachingSession()", "Session", "PING", hit_server)
    lines.append(f"Cache stats at the end: {stats}")
    return lines


async def ameasure(client: redis.Redis, url: str, schema: str, n: int) -> list[str]:
    """The same anatomy for ``CachingAsyncSession`` (asyncpg, the asyncio Redis client): its hit is
    looked up on the event loop, its miss runs the SELECT in SQLAlchemy's greenlet and stores the
    rows in a task of the loop that the read doesn't await."""
    engine = create_async_engine(PG_ASYNC_URL, execution_options={"schema_translate_map": {None: schema}})
    cache = Cache(backend=url, prefix="anatomy-async")
    caching = async_sessionmaker(engine, class_=CachingAsyncSession, cache=cache)
    plain = async_sessionmaker(engine)
    aclient = redis.asyncio.Redis.from_url(url)  # the floor's round trip: the client's own PING

    def uid(i: int) -> int:
        return i % ROWS + 1

    async def atimed(fn: Callable[[], Any]) -> int:
        t0 = time.perf_counter_ns()
        await fn()
        return time.perf_counter_ns() - t0

    def get_with(factory: Callable[[], AsyncSession], i: int) -> Callable[[], Any]:
        async def go() -> Any:
            async with factory() as s:
                return await s.get(User, i)

        return go

    async def open_close() -> None:
        async with caching():
            pass

    store = "the store (a task of the loop, not awaited)"
    try:
        for i in range(ROWS):  # every row cached
            await get_with(caching, uid(i))()
        await cache.await_for_stores()
        pieces = Pieces()
        pieces.wrap(session_mod, "plan_get", "plan (key, policy)")
        pieces.awrap(near_mod, "alookup", "lookup round trip")
        pieces.wrap(session_mod, "finish_get", "decode + attach")
        pieces.wrap(execute_mod, "invoke", "the SELECT (statement)")
        pieces.awrap(Resilient, "_astore", store)
        m = Samples()
        lookup_calls = lookup_usec = store_calls = store_usec = 0
        for r in range(n):
            i = uid(r)
            m.ping.append(await atimed(aclient.ping))
            m.plain_get.append(await atimed(get_with(plain, i)))
            m.session_only.append(await atimed(open_close))

            pieces.take()
            c0, u0 = server_usec(client, "evalsha")
            m.hit_total.append(await atimed(get_with(caching, i)))
            c1, u1 = server_usec(client, "evalsha")
            lookup_calls, lookup_usec = lookup_calls + c1 - c0, lookup_usec + u1 - u0
            for k, v in pieces.take().items():
                m.hit_parts.setdefault(k, []).append(v)

            await cache.ainvalidate(User, pks=[i])
            await cache.await_for_stores()
            pieces.take()
            c0, u0 = server_usec(client, "evalsha")
            m.miss_total.append(await atimed(get_with(caching, i)))
            await cache.await_for_stores()  # the store's task: landed, outside the timed region
            c1, u1 = server_usec(client, "evalsha")
            store_calls, store_usec = store_calls + c1 - c0, store_usec + u1 - u0
            for k, v in pieces.take().items():
                m.miss_parts.setdefault(k, []).append(v)
        pieces.restore()
        stats = cache.stats()
    finally:
        await cache.aclose()
        await engine.dispose()
        await aclient.aclose()

    hit_server = lookup_usec / max(1, lookup_calls)
    miss_server = store_usec / max(1, store_calls)
    stored = median_us(m.miss_parts.pop(store, []))
    m.miss_parts.pop("decode + attach", None)  # (a miss has nothing to decode: its ticket, ~1 µs)
    lines = [
        "## Anatomy of a cached `session.get` (asyncio: asyncpg + redis.asyncio, on loopback)",
        "",
        f"{n} hits and {n} misses, interleaved with the floor's measurements. Redis server time per "
        f"EVALSHA: {hit_server:.1f} µs on a hit, {miss_server:.1f} µs per script on a miss. The "
        "round trip of the floor is the asyncio client's own `PING`.",
        "",
    ]
    lines += hit_and_miss(
        m, " (async)", "CachingAsyncSession()", "AsyncSession", "the asyncio client's PING", hit_server
    )
    lines.append(
        f"The store runs as a task of the event loop, which the read doesn't wait for: {stored:.1f} µs "
        "from its start to its reply (median). On one loop it runs while the session closes, so its "
        "Python shares the loop with the read's last steps; it is not counted in the pieces above.\n"
    )
    lines.append(f"Cache stats at the end: {stats}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--output", help="also write the report to this file")
    args = parser.parse_args()
    report = run(args.iterations)
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
