#!/usr/bin/env python
"""Near-cache fan-out window: from a commit() returning in one process to the entry being gone
from the near-cache of every other process.

Eight processes on PostgreSQL and Redis on loopback: one writer and seven readers, each reader with
``Cache(near_cache=True, near_coherence="fanout")``. Run from the repository root:

    .venv/bin/python benchmarks/bench_near.py [--iterations N | --duration S] [--quick] [--readers R]
                                              [--load-rate C] [--output FILE.md]

One iteration: every reader reads the probe row (``session.get``) until it is served from its
near-cache, and says so; the writer commits a new value of that row and notes the clock when
``commit()`` returned; each reader notes the clock when its fan-out subscriber applied the eviction
that removed the probe's entry (a wrapper around the near-cache's ``apply``, so nobody busy-polls).
The window is the reader's time minus the writer's: negative when the entry was gone before
``commit()`` returned (the bump is published before the commit's own bookkeeping ends). Clock:
``time.monotonic_ns()`` — CLOCK_MONOTONIC, one clock for every process on Linux.

Two phases: ``idle`` (nothing else runs) and ``load`` (the writer also commits to other rows at
``--load-rate`` commits/s from a second thread — each one a fan-out message every reader applies —
and every reader serves ~500 near-cache reads/s of other rows from a second thread).

Needs PostgreSQL and Redis: ``SQLACACHE_BENCH_PG_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and ``SQLACACHE_BENCH_REDIS_URL`` (default
``redis://127.0.0.1:6379/14``). Works in a private schema ``sqlacache_bench_<id>`` (dropped at the
end) and under its own key prefix (its keys deleted at the end; never FLUSHDB).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import statistics
import sys
import threading
import time
import traceback
import uuid
from typing import Any

import redis
import sqlalchemy
from sqlalchemy import String, create_engine, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sqlacache import Cache, CachingSession

PG_URL = os.environ.get("SQLACACHE_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SQLACACHE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
N_ITEMS = 200
READER_LOAD_RATE = 500.0  # near-cache reads/s per reader in the load phase


class Base(DeclarativeBase):
    pass


class Probe(Base):
    """The row whose eviction is timed (a table of its own: only its entry depends on it)."""

    __tablename__ = "near_probe"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[str] = mapped_column(String(40))


class Item(Base):
    """Rows for the load: read by the readers, written by the writer's load thread."""

    __tablename__ = "near_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[str] = mapped_column(String(40))


def schema_args(schema: str) -> dict[str, Any]:
    return {"options": f"-csearch_path={schema}"}


# -- the processes -------------------------------------------------------------------------------


class _Load:
    """A thread doing ``step`` ``rate`` times a second until stopped."""

    def __init__(self, step: Any, rate: float) -> None:
        self.step, self.rate = step, rate
        self.stop = threading.Event()
        self.done = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        period = 1.0 / self.rate
        due = time.monotonic()
        while not self.stop.is_set():
            self.step()
            self.done += 1
            due += period
            self.stop.wait(max(0.0, due - time.monotonic()))

    def close(self) -> int:
        self.stop.set()
        self.thread.join(10)
        return self.done


def _reader(conn: Any, schema: str, prefix: str) -> None:
    try:
        engine = create_engine(PG_URL, connect_args=schema_args(schema))
        cache = Cache(backend=REDIS_URL, prefix=prefix, near_cache=True, near_coherence="fanout")
        S = sessionmaker(engine, class_=CachingSession, cache=cache)
        near = cache.near
        assert near is not None
        held: list[str] = []
        armed = threading.Event()
        gone = threading.Event()
        gone_at = [0]
        original = near.apply

        def apply(deps: frozenset[str]) -> None:
            original(deps)
            if armed.is_set() and not any(key in near._entries for key in held):
                gone_at[0] = time.monotonic_ns()
                armed.clear()
                gone.set()

        near.apply = apply  # type: ignore[method-assign]

        def read_item() -> None:
            with S() as s:
                s.get(Item, random.randint(1, N_ITEMS))

        conn.send(("ready", os.getpid()))
        load: _Load | None = None
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                break
            if cmd == "load":
                if load is not None:
                    load.close()
                load = _Load(read_item, READER_LOAD_RATE) if arg else None
                conn.send(("ok", None))
            elif cmd == "hold":
                for _ in range(200):
                    before = cache.stats()["near_hits"]
                    with S() as s:
                        value = s.get(Probe, 1).value
                    if cache.stats()["near_hits"] > before:
                        break
                    cache.wait_for_stores()
                else:
                    raise RuntimeError(f"the probe is never served from the near-cache: {cache.stats()}")
                held[:] = [
                    k for k, e in list(near._entries.items()) if any("near_probe" in d for d in e.entry.deps)
                ]
                gone.clear()
                armed.set()
                if not any(key in near._entries for key in held):  # evicted in between: hold again
                    armed.clear()
                    conn.send(("again", None))
                    continue
                conn.send(("held", value))
            elif cmd == "wait":
                ok = gone.wait(arg)
                armed.clear()
                conn.send(("gone", gone_at[0] if ok else None))
            elif cmd == "stats":
                conn.send(("ok", cache.stats()))
        if load is not None:
            load.close()
        cache.close()
        engine.dispose()
    except BaseException:
        conn.send(("failed", traceback.format_exc()))


def _writer(conn: Any, schema: str, prefix: str) -> None:
    try:
        engine = create_engine(PG_URL, connect_args=schema_args(schema))
        cache = Cache(backend=REDIS_URL, prefix=prefix)
        S = sessionmaker(engine, class_=CachingSession, cache=cache)

        def write_item() -> None:
            with S() as s:
                s.execute(
                    update(Item).where(Item.id == random.randint(1, N_ITEMS)).values(value=uuid.uuid4().hex)
                )
                s.commit()

        conn.send(("ready", os.getpid()))
        load: _Load | None = None
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                break
            if cmd == "load":
                done = load.close() if load is not None else 0
                load = _Load(write_item, arg) if arg else None
                conn.send(("ok", done))
            elif cmd == "commit":
                with S() as s:
                    s.get(Probe, 1).value = arg
                    began = time.monotonic_ns()
                    s.commit()
                    returned = time.monotonic_ns()
                conn.send(("ok", (began, returned)))
            elif cmd == "stats":
                conn.send(("ok", cache.stats()))
        if load is not None:
            load.close()
        cache.close()
        engine.dispose()
    except BaseException:
        conn.send(("failed", traceback.format_exc()))


class Proc:
    def __init__(self, target: Any, *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(theirs, *args), daemon=True)
        self.process.start()

    def recv(self, timeout: float = 60) -> tuple[str, Any]:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"process {self.process.pid} did not answer within {timeout} s")
        status, value = self.conn.recv()
        if status == "failed":
            raise RuntimeError(f"process {self.process.pid} failed:\n{value}")
        return status, value

    def send(self, cmd: str, arg: Any = None) -> None:
        self.conn.send((cmd, arg))

    def call(self, cmd: str, arg: Any = None) -> Any:
        self.send(cmd, arg)
        return self.recv()[1]

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.send("stop")
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


# -- the run -------------------------------------------------------------------------------------


def run_phase(
    writer: Proc, readers: list[Proc], iterations: int | None, duration: float | None, tag: str
) -> tuple[list[float], list[float], int]:
    """Windows (ms, one per reader per iteration), commit() durations (ms), timeouts."""
    windows: list[float] = []
    commits: list[float] = []
    timeouts = 0
    deadline = time.monotonic() + duration if duration else None
    i = 0
    while (iterations is not None and i < iterations) or (
        deadline is not None and time.monotonic() < deadline
    ):
        i += 1
        for r in readers:
            while True:
                r.send("hold")
                status, _ = r.recv()
                if status == "held":
                    break
        began, returned = writer.call("commit", f"{tag}-{i}")
        commits.append((returned - began) / 1e6)
        for r in readers:
            r.send("wait", 5.0)
        for r in readers:
            _, gone = r.recv()
            if gone is None:
                timeouts += 1
            else:
                windows.append((gone - returned) / 1e6)
    return windows, commits, timeouts


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def row(name: str, values: list[float], commits: list[float], timeouts: int) -> str:
    if not values:
        return f"| {name} | 0 | — | — | — | — | — | {timeouts} |"
    return (
        f"| {name} | {len(values)} | {statistics.median(values):.2f} | {pct(values, 99):.2f} "
        f"| {max(values):.2f} | {min(values):.2f} | {statistics.median(commits):.2f} | {timeouts} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=None, help="commits per phase (default 300)")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per phase instead of --iterations"
    )
    parser.add_argument("--quick", action="store_true", help="30 commits per phase: a smoke run")
    parser.add_argument("--readers", type=int, default=7, help="reader processes (default 7)")
    parser.add_argument(
        "--load-rate", type=float, default=200.0, help="the writer's background commits/s in the load phase"
    )
    parser.add_argument("--output", help="also write the report (Markdown) to this file")
    args = parser.parse_args()
    iterations = None if args.duration else (args.iterations or (30 if args.quick else 300))

    run_id = uuid.uuid4().hex[:10]
    schema = f"sqlacache_bench_{run_id}"
    prefix = f"sqlacache-bench-{run_id}"
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    admin = create_engine(PG_URL)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_engine(PG_URL, connect_args=schema_args(schema))
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Probe(id=1, value="start"))
        s.add_all([Item(id=i, value=f"item{i}") for i in range(1, N_ITEMS + 1)])
        s.commit()
    procs: list[Proc] = []
    results: dict[str, tuple[list[float], list[float], int]] = {}
    reader_stats: list[dict[str, Any]] = []
    load_commits = 0
    load_seconds = 0.0
    try:
        writer = Proc(_writer, schema, prefix)
        readers = [Proc(_reader, schema, prefix) for _ in range(args.readers)]
        procs = [writer, *readers]
        for p in procs:
            p.recv(120)
        print(
            f"near-cache fan-out window: 1 writer, {len(readers)} readers, "
            f"{f'{iterations} commits' if iterations else f'{args.duration:.0f} s'} per phase",
            file=sys.stderr,
        )
        run_phase(writer, readers, 5, None, "warmup")
        results["idle"] = run_phase(writer, readers, iterations, args.duration, "idle")
        print(f"  idle done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        for r in readers:
            r.call("load", True)
        writer.call("load", args.load_rate)
        load_began = time.monotonic()
        try:
            results["load"] = run_phase(writer, readers, iterations, args.duration, "load")
        finally:
            load_commits = writer.call("load", 0)
            load_seconds = time.monotonic() - load_began
            for r in readers:
                r.call("load", False)
        print(f"  load done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        reader_stats = [r.call("stats") for r in readers]
    finally:
        for p in procs:
            p.close()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + ":*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        left = sum(1 for _ in client.scan_iter(match=prefix + ":*", count=1000))
        client.close()
        engine.dispose()
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()

    elapsed = time.monotonic() - started
    resyncs = sum(s.get("near_resyncs", 0) for s in reader_stats)
    lines = [
        "## sqlacache near-cache fan-out window",
        "",
        f"1 writer + {len(reader_stats)} reader processes (near_coherence='fanout'), PostgreSQL + Redis on "
        f"loopback. Window = when the reader's subscriber evicted the entry minus when the writer's commit() "
        f"returned, CLOCK_MONOTONIC, ms (negative: gone before commit() returned). Python "
        f"{sys.version.split()[0]}, SQLAlchemy {sqlalchemy.__version__}, {os.cpu_count()} CPUs, 1-min load "
        f"average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end; total run {elapsed:.0f} s.",
        "",
        "| phase | samples | p50 ms | p99 ms | max ms | min ms | commit() p50 ms | not evicted in 5 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *[row(name, *results[name]) for name in ("idle", "load") if name in results],
        "",
        f"load phase: the writer also committed {load_commits} other rows from a second thread "
        f"({load_commits / max(load_seconds, 1e-9):.0f}/s for a target of {args.load_rate:.0f}/s), "
        f"each reader served ~{READER_LOAD_RATE:.0f} reads/s of other rows. "
        f"Readers' resynchronisations during the run: {resyncs}. Keys left under the run's prefix: {left}; "
        f"schema {schema} dropped.",
    ]
    out = "\n".join(lines) + "\n"
    print(out)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
