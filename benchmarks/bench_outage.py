#!/usr/bin/env python
"""What a broken Redis costs each request: latency added over an uncached read, fault by fault.

PostgreSQL on loopback and a throwaway ``redis-server`` (started here, on a free port, behind a TCP
proxy), sync ``CachingSession``. Run from the repository root:

    .venv/bin/python benchmarks/bench_outage.py [--requests N] [--output FILE.md]

For each fault the cache is warmed, the fault is switched on, and N requests are timed, each a
fresh session doing ``session.get`` of one of 100 users (a hit when Redis works). The ``uncached``
row is a plain ``Session`` doing the same. Faults:

* ``healthy``   nothing broken (for reference: hits)
* ``killed``    redis-server killed: connections refused at once
* ``paused``    SIGSTOP: connections accepted, nothing answered (every call would time out)
* ``slow``      the proxy delays every byte by 200 ms (past the 50 ms socket timeout)
* ``oom``       maxmemory reached with ``noeviction``: reads work, writes fail

Each request is verified (the right row, no exception). The circuit breaker is what keeps the
added cost near zero: only a request that meets a closed breaker, or the probe after each cooldown,
pays the socket timeout. Columns: median, p99 and max in ms; ``added`` = median - uncached median;
``>25 ms`` = requests that paid a timeout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sqlacache import Cache, CachingSession
from tests.faults import RedisServer, TcpProxy
from tests.models import Base, User

PG_URL = os.environ.get("SQLACACHE_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _time(make_session: Callable[[], Session], n: int) -> list[float]:
    out = []
    for i in range(n):
        pk = i % 100 + 1
        started = time.perf_counter()
        with make_session() as s:
            user = s.get(User, pk)
        out.append(time.perf_counter() - started)
        assert user is not None and user.name == f"u{pk}"
    return out


@contextmanager
def _fault(name: str, server: RedisServer, proxy: TcpProxy) -> Iterator[None]:
    if name == "killed":
        server.stop()
        try:
            yield
        finally:
            server.start()
    elif name == "paused":
        with server.paused():
            yield
    elif name == "slow":
        proxy.set_latency(0.2)
        try:
            yield
        finally:
            proxy.heal()
    elif name == "oom":
        server.fill_until_oom()
        try:
            yield
        finally:
            server.clear_oom()
    else:
        yield


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--output")
    args = parser.parse_args()

    schema = f"sqlacache_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine = create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    server = RedisServer()
    server.start()
    proxy = TcpProxy(server.port)
    proxy.start()
    rows = []
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([User(id=i, name=f"u{i}") for i in range(1, 101)])
            s.commit()
        plain = sessionmaker(engine)
        _time(plain, 200)
        base = _time(plain, args.requests)
        rows.append(("uncached", base, None))
        for fault in ("healthy", "killed", "paused", "slow", "oom"):
            server.flushall()
            cache = Cache(backend=proxy.url, prefix=f"sqlacache-bench-{uuid.uuid4().hex[:8]}")
            cached = sessionmaker(engine, class_=CachingSession, cache=cache)
            for _ in range(3):
                _time(cached, 100)
            cache.reset_stats()
            with _fault(fault, server, proxy):
                timings = _time(cached, args.requests)
                stats = cache.stats()
            rows.append((fault, timings, stats))
            cache.close()
    finally:
        proxy.stop()
        server.close()
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    base_median = statistics.median(base) * 1000
    head = f"{'fault':<10}{'median':>9}{'p99':>9}{'max':>9}{'added':>9}{'>25 ms':>8}{'hits':>7}"
    head += f"{'breaker opened':>16}"
    lines = [
        f"{args.requests} requests per fault (ms; sync get, PostgreSQL on loopback)",
        "",
        head,
        "-" * len(head),
    ]
    for name, timings, stats in rows:
        ms = sorted(t * 1000 for t in timings)
        median = statistics.median(ms)
        p99 = ms[int(len(ms) * 0.99) - 1]
        slow = sum(1 for t in ms if t > 25)
        hits = stats["hits"] if stats else 0
        opened = stats["breaker_opened"] if stats else 0
        added = f"{median - base_median:+.2f}" if stats else ""
        lines.append(
            f"{name:<10}{median:>9.2f}{p99:>9.2f}{ms[-1]:>9.1f}{added:>9}{slow:>8}{hits:>7}{opened:>16}"
        )
    report = "\n".join(lines)
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
