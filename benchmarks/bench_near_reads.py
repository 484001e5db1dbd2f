#!/usr/bin/env python
"""Near-cache read benchmark: plain SQLAlchemy vs sqlacache on Redis, without and with the near-cache.

PostgreSQL and Redis on loopback, the same table and rows as ``bench_reads.py``. Run from the
repository root:

    .venv/bin/python benchmarks/bench_near_reads.py [--iterations N] [--quick] [--output FILE.md]

Variants, each a fresh session per operation (sync: ``CachingSession``; async:
``CachingAsyncSession`` inside one event loop):

* ``uncached``  plain ``Session`` / ``AsyncSession``: the SELECT.
* ``redis``     ``Cache(backend=redis)``: a hit is a Redis round trip plus decoding.
* ``strict``    ``near_cache=True`` (``near_coherence="strict"``): a hit from process memory after
                one small round trip per transaction (the fan-out position).
* ``fanout``    ``near_cache=True, near_coherence="fanout"``: a hit from process memory, no round trip.

Operations: ``get`` hit, a 20-row list hit, and a session doing 10 ``get`` hits (one transaction).
Every timed operation is checked outside the timed region: values equal to the database's, no SQL
for hits, and the cache counters (a near variant's hits come from memory: ``near_hits`` moves).
The issue's targets: fan-out get hit <= 0.20x uncached, list hit <= 0.30x; strict get hit no slower
than a Redis hit; a session of 10 reads >= 2x faster with the strict near-cache than without.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
from sqlalchemy import create_engine, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_reads import (
    N_GROUPS,
    N_ROWS,
    PG_ASYNC_URL,
    PG_SYNC_URL,
    REDIS_URL,
    Counter,
    User,
    ameasure,
    check,
    create_schema,
    drop_schema,
    group_ids,
    load_expected,
    measure,
    schema_args,
    snapshot,
)

from sqlacache import Cache, CachingAsyncSession, CachingSession

VARIANTS = {
    "redis": {},
    "strict": {"near_cache": True},
    "fanout": {"near_cache": True, "near_coherence": "fanout"},
}
TARGETS = {
    ("fanout", "get hit"): ("x uncached", 0.20),
    ("fanout", "list hit (20 rows)"): ("x uncached", 0.30),
    ("strict", "get hit"): ("x redis", 1.0),
    ("strict", "10 gets, one session"): ("x redis", 0.5),
}


def stmt_for(g: int) -> Any:
    return select(User).where(User.group == g).order_by(User.id)


class Moved:
    """The cache's hit counters moved as expected (checked outside the timed region)."""

    def __init__(self, cache: Cache, near: bool) -> None:
        self.cache, self.near = cache, near
        self.last = cache.stats()

    def __call__(self, what: str, hits: int) -> None:
        now = self.cache.stats()
        got = now["hits"] - self.last["hits"]
        check(got == hits, f"{what}: {got} hits, expected {hits}")
        check(now["misses"] == self.last["misses"], f"{what}: a miss")
        if self.near:
            near = now["near_hits"] - self.last.get("near_hits", 0)
            check(near == hits, f"{what}: {near} of {hits} hits from memory")
        self.last = now


def check_get(obj: Any, i: int, statements: int, moved: Moved | None) -> None:
    check(snapshot(obj) == expected_rows[i], "get: wrong values")
    check(statements == (moved is None), "get: statements")
    if moved is not None:
        moved("get", 1)


def check_list(objs: list[Any], g: int, statements: int, moved: Moved | None) -> None:
    check([o.id for o in objs] == group_ids(g), "list: wrong rows")
    check(statements == (moved is None), "list: statements")
    if moved is not None:
        moved("list", 1)


def check_ten(objs: list[Any], ids: list[int], moved: Moved | None) -> None:
    check([snapshot(o) for o in objs] == [expected_rows[i] for i in ids], "10 gets: wrong values")
    if moved is not None:
        moved("10 gets", 10)


expected_rows: dict[int, Any] = {}  # what the database holds, filled in main()


def bench_sync(schema: str, iterations: int) -> dict[str, dict[str, Any]]:
    engine = create_engine(PG_SYNC_URL, connect_args=schema_args(PG_SYNC_URL, schema))
    sql = Counter()
    sql.listen(engine)
    prefix = f"bench-near-{uuid.uuid4().hex[:8]}"
    caches = {
        name: Cache(backend=REDIS_URL, prefix=f"{prefix}-{name}", **kw) for name, kw in VARIANTS.items()
    }
    plain = sessionmaker(engine)
    makers = {name: sessionmaker(engine, class_=CachingSession, cache=c) for name, c in caches.items()}
    time.sleep(0.3)  # the subscribers subscribe
    for name, maker in makers.items():  # a first read stores, a second reads Redis (and fills memory)
        for _ in range(2):
            for i in range(1, N_ROWS + 1):
                with maker() as s:
                    s.get(User, i)
            for g in range(1, N_GROUPS + 1):
                with maker() as s:
                    s.scalars(stmt_for(g)).all()
            caches[name].wait_for_stores()
    out: dict[str, dict[str, Any]] = {"get hit": {}, "list hit (20 rows)": {}, "10 gets, one session": {}}

    def uid(n: int) -> int:
        return n % N_ROWS + 1

    def get_step(maker: Any, moved: Moved | None) -> Callable[[int], int]:
        def step(n: int) -> int:
            i, before = uid(n), sql.n
            t0 = time.perf_counter_ns()
            with maker() as s:
                obj = s.get(User, i)
            t1 = time.perf_counter_ns()
            check_get(obj, i, sql.n - before, moved)
            return t1 - t0

        return step

    def list_step(maker: Any, moved: Moved | None) -> Callable[[int], int]:
        def step(n: int) -> int:
            g, before = n % N_GROUPS + 1, sql.n
            statement = stmt_for(g)
            t0 = time.perf_counter_ns()
            with maker() as s:
                objs = s.scalars(statement).all()
            t1 = time.perf_counter_ns()
            check_list(objs, g, sql.n - before, moved)
            return t1 - t0

        return step

    def ten_step(maker: Any, moved: Moved | None) -> Callable[[int], int]:
        def step(n: int) -> int:
            ids = [uid(n * 10 + k) for k in range(10)]
            t0 = time.perf_counter_ns()
            with maker() as s:
                objs = [s.get(User, i) for i in ids]
            t1 = time.perf_counter_ns()
            check_ten(objs, ids, moved)
            return t1 - t0

        return step

    for op, make in (
        ("get hit", get_step),
        ("list hit (20 rows)", list_step),
        ("10 gets, one session", ten_step),
    ):
        steps = {"uncached": make(plain, None)}
        for name, maker in makers.items():
            steps[name] = make(maker, Moved(caches[name], name != "redis"))
        out[op] = measure(steps, iterations, max(20, iterations // 10))
    for cache in caches.values():
        cache.invalidate_all()
        cache.close()
    engine.dispose()
    return out


async def bench_async(schema: str, iterations: int) -> dict[str, dict[str, Any]]:
    engine = create_async_engine(PG_ASYNC_URL, connect_args=schema_args(PG_ASYNC_URL, schema))
    sql = Counter()
    sql.listen(engine.sync_engine)
    prefix = f"bench-near-a-{uuid.uuid4().hex[:8]}"
    caches = {
        name: Cache(backend=REDIS_URL, prefix=f"{prefix}-{name}", **kw) for name, kw in VARIANTS.items()
    }
    plain = async_sessionmaker(engine)
    makers = {
        name: async_sessionmaker(engine, class_=CachingAsyncSession, cache=c) for name, c in caches.items()
    }
    await asyncio.sleep(0.3)
    for name, maker in makers.items():
        for _ in range(2):
            for i in range(1, N_ROWS + 1):
                async with maker() as s:
                    await s.get(User, i)
            for g in range(1, N_GROUPS + 1):
                async with maker() as s:
                    (await s.scalars(stmt_for(g))).all()
            await caches[name].await_for_stores()
    out: dict[str, dict[str, Any]] = {}

    def uid(n: int) -> int:
        return n % N_ROWS + 1

    def get_step(maker: Any, moved: Moved | None) -> Any:
        async def step(n: int) -> int:
            i, before = uid(n), sql.n
            t0 = time.perf_counter_ns()
            async with maker() as s:
                obj = await s.get(User, i)
            t1 = time.perf_counter_ns()
            check_get(obj, i, sql.n - before, moved)
            return t1 - t0

        return step

    def list_step(maker: Any, moved: Moved | None) -> Any:
        async def step(n: int) -> int:
            g, before = n % N_GROUPS + 1, sql.n
            statement = stmt_for(g)
            t0 = time.perf_counter_ns()
            async with maker() as s:
                objs = (await s.scalars(statement)).all()
            t1 = time.perf_counter_ns()
            check_list(objs, g, sql.n - before, moved)
            return t1 - t0

        return step

    def ten_step(maker: Any, moved: Moved | None) -> Any:
        async def step(n: int) -> int:
            ids = [uid(n * 10 + k) for k in range(10)]
            t0 = time.perf_counter_ns()
            async with maker() as s:
                objs = [await s.get(User, i) for i in ids]
            t1 = time.perf_counter_ns()
            check_ten(objs, ids, moved)
            return t1 - t0

        return step

    for op, make in (
        ("get hit", get_step),
        ("list hit (20 rows)", list_step),
        ("10 gets, one session", ten_step),
    ):
        steps = {"uncached": make(plain, None)}
        for name, maker in makers.items():
            steps[name] = make(maker, Moved(caches[name], name != "redis"))
        out[op] = await ameasure(steps, iterations, max(20, iterations // 10))
    for cache in caches.values():
        await cache.ainvalidate_all()
        await cache.aclose()
    await engine.dispose()
    return out


def report(results: dict[str, dict[str, dict[str, Any]]], iterations: int, seconds: float) -> str:
    lines = [
        "## sqlacache near-cache read benchmark",
        "",
        f"PostgreSQL + Redis on loopback; fresh session per operation; {iterations} timed iterations per "
        f"variant, µs, median (p90); total {seconds:.0f} s; 2 CPUs, load {os.getloadavg()[0]:.2f}.",
        "",
        "| mode | operation | uncached | redis | strict | fanout | redis/uncached | strict/uncached "
        "| fanout/uncached | strict/redis | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode, ops in results.items():
        for op, r in ops.items():
            u, rd, st, fo = (r[k][0] for k in ("uncached", "redis", "strict", "fanout"))
            targets = []
            for (variant, name), (unit, limit) in TARGETS.items():
                if name == op:
                    got = (fo if variant == "fanout" else st) / (u if unit == "x uncached" else rd)
                    targets.append(f"{variant} {unit} <= {limit}: {'PASS' if got <= limit else 'FAIL'}")
            lines.append(
                f"| {mode} | {op} | "
                + " | ".join(
                    f"{r[k][0]:.1f} ({r[k][1]:.1f})" for k in ("uncached", "redis", "strict", "fanout")
                )
                + f" | {rd / u:.2f} | {st / u:.2f} | {fo / u:.2f} | {st / rd:.2f} | {'; '.join(targets)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 iterations: a smoke run")
    parser.add_argument("--output", help="also write the report (Markdown) to this file")
    args = parser.parse_args()
    iterations = 200 if args.quick else args.iterations
    redis.Redis.from_url(REDIS_URL).ping()
    schema = f"sqlacache_near_{uuid.uuid4().hex[:10]}"
    started = time.monotonic()
    create_schema(schema)
    try:
        probe = create_engine(PG_SYNC_URL, connect_args=schema_args(PG_SYNC_URL, schema))
        expected_rows.update(load_expected(probe))
        probe.dispose()
        results = {"sync": bench_sync(schema, iterations)}
        results["async"] = asyncio.run(bench_async(schema, iterations))
    finally:
        drop_schema(schema)
    text = report(results, iterations, time.monotonic() - started)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
