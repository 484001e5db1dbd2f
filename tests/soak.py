"""Soak: many workers read and write through ``CachingSession`` while Redis restarts and pauses.

    python -m tests.soak --duration 60 [--processes 4 --threads 4 --db postgres|sqlite --seed N]

The parent creates a private PostgreSQL schema (``SQLACACHE_TEST_PG_URL``) or a SQLite file in WAL
mode, starts its own ``redis-server`` on a free loopback port and spawns the worker processes. While
they run, it restarts Redis (its data lost) and pauses it (SIGSTOP for 0.1 to 1.5 s, then SIGCONT) at
random intervals drawn from the seeded RNG.

Each worker thread mixes cached reads (``get``, a group's list, a group's count) with committed
writes (update, move to another group, insert, delete). Every write bumps the row's ``version``,
which is also the mapper's ``version_id_col``: the database refuses an update or delete made from
an outdated version, so committed versions of an id strictly increase and ids are never reused.
That makes these checks exact:

* **read exceptions**: any exception raised by a read (the cache must never raise);
* **stale after own commit**: a read started after this process committed version ``v`` of a row
  returns an older version, a row this process deleted, or — confirmed against the database, whose
  row must still be at ``v`` after the read — misses the row from ``get``/its group's list;
* **cross-process stale** (reported, not asserted): a read returns an older version than the
  highest that any process had recorded as committed when the read started. A process cut off from
  Redis delivers its invalidations only once it reconnects; that window is documented;
* **final mismatches**: after the chaos stops, every process stops writing, delivers its pending
  invalidations (``cache.retry_pending()``), waits for the others, then reads every row, every
  group's list and count through the cache twice (the second time from hits) and compares them with
  a plain, non-caching session's reads.

Exit status 1 when any of these is non-zero: read exceptions, stale reads after own commits, final
mismatches, malformed results (a list out of order or holding another group's row), non-database
exceptions from writes, sqlacache's own ``errors.internal``; or when the cache served no hit at all
in the second pass of the final check, or the harness failed (a worker died, hung or did not report,
pending invalidations were not delivered). ``--stats`` prints every process's ``cache.stats()``,
``--no-chaos`` leaves Redis alone (a baseline), ``--verbose`` shows sqlacache's warnings.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Integer, String, create_engine, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from tests.faults import RedisServer
from tests.helpers import wal

PG_URL = os.environ.get("SQLACACHE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

GROUPS = 5
INITIAL_ROWS = 50
MIN_ROWS, MAX_ROWS = 35, 80  # deletes and inserts keep the table between these (roughly)
MAX_IDS = 1 << 18  # ids tracked in the shared array (inserts beyond it are not checked)
DELETED = 1 << 60  # "version" recorded for a deleted id: newer than any real version
WRITE_ATTEMPTS = 3
LOGGED_PER_KIND = 10  # details printed per process and kind of finding

OPS = ("get", "list", "count", "update", "move", "insert", "delete")
WEIGHTS = (40, 20, 10, 15, 7, 4, 4)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "soak_items"
    __table_args__ = {"sqlite_autoincrement": True}  # never reuse a deleted id

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_id: Mapped[int] = mapped_column(Integer, index=True)
    version: Mapped[int] = mapped_column(Integer)
    value: Mapped[str] = mapped_column(String(64))

    # The application sets the version (always old + 1); the database checks the old one.
    __mapper_args__ = {"version_id_col": version, "version_id_generator": False}


RowState = tuple[int, int, str]  # (group_id, version, value) as read; None: no such row


def _state(item: Item | None) -> RowState | None:
    return None if item is None else (item.group_id, item.version, item.value)


# ---------------------------------------------------------------------------------------------
# Databases


def make_engine(db: dict[str, Any], pool_size: int = 5) -> Any:
    if db["kind"] == "sqlite":
        engine = create_engine(db["url"], pool_size=pool_size, max_overflow=4)
        wal(engine)
        return engine
    return create_engine(
        db["url"],
        connect_args={"options": f"-csearch_path={db['schema']}"},
        pool_size=pool_size,
        max_overflow=4,
    )


@contextmanager
def database(kind: str) -> Iterator[dict[str, Any]]:
    """A fresh database with the soak table and its first rows; removed at the end."""
    if kind == "sqlite":
        tmp = tempfile.mkdtemp(prefix="sqlacache-soak-")
        db: dict[str, Any] = {"kind": kind, "url": f"sqlite:///{os.path.join(tmp, 'soak.db')}"}
        try:
            _create(db)
            yield db
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    schema = f"sqlacache_soak_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        try:
            db = {"kind": kind, "url": PG_URL, "schema": schema}
            _create(db)
            yield db
        finally:
            with admin.begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '20s'"))
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    finally:
        admin.dispose()


def _create(db: dict[str, Any]) -> None:
    engine = make_engine(db)
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all(
                Item(group_id=i % GROUPS + 1, version=1, value=f"seed-{i}") for i in range(INITIAL_ROWS)
            )
            s.commit()
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# Worker processes


@dataclass
class Shared:
    """What every process sees: the highest committed version per id (after commit returned)."""

    committed: Any  # mp.Array("q", MAX_IDS): 0 unknown, DELETED for a deleted id
    max_id: Any  # mp.Value("q")
    stop: Any  # mp.Event: stop writing (and reading), then verify
    start_barrier: Any  # processes + parent
    verify_barrier: Any  # processes
    results: Any  # mp.Queue of result dicts


@dataclass
class Own:
    """This process's own committed writes: id -> (group, version, value, deleted)."""

    rows: dict[int, tuple[int, int, str, bool]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, ident: int, state: RowState | None) -> None:
        with self.lock:
            old = self.rows.get(ident)
            if state is None:
                self.rows[ident] = (old[0], old[1], old[2], True) if old else (0, 0, "", True)
            elif old is None or (not old[3] and old[1] < state[1]):
                self.rows[ident] = (*state, False)

    def get(self, ident: int) -> tuple[int, int, str, bool] | None:
        with self.lock:
            return self.rows.get(ident)

    def snapshot(self) -> dict[int, tuple[int, int, str, bool]]:
        with self.lock:
            return dict(self.rows)


class Worker:
    def __init__(self, cfg: dict[str, Any], shared: Shared) -> None:
        from sqlacache import Cache, CachingSession

        self.cfg = cfg
        self.shared = shared
        self.index: int = cfg["index"]
        self.engine = make_engine(cfg["db"], pool_size=cfg["threads"] + 2)
        self.plain_engine = make_engine(cfg["db"], pool_size=2)
        self.cache = Cache(backend=cfg["redis_url"], prefix=cfg["prefix"])
        self.Session = sessionmaker(self.engine, class_=CachingSession, cache=self.cache)
        self.Plain = sessionmaker(self.plain_engine)
        self.own = Own()
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.logged: Counter[str] = Counter()

    # -- reporting ----------------------------------------------------------------------------

    def add(self, counts: Counter[str]) -> None:
        with self.lock:
            self.counts.update(counts)

    def report(self, kind: str, message: str) -> None:
        with self.lock:
            self.logged[kind] += 1
            if self.logged[kind] > LOGGED_PER_KIND:
                return
        print(f"[soak p{self.index}] {kind}: {message}", file=sys.stderr, flush=True)

    # -- shared state -------------------------------------------------------------------------

    def committed(self, ident: int) -> int:
        return int(self.shared.committed[ident]) if 0 < ident < MAX_IDS else 0

    def committed_all(self) -> list[int]:
        hi = min(int(self.shared.max_id.value) + 1, MAX_IDS)
        return list(self.shared.committed[:hi])

    def record(self, ident: int, state: RowState | None) -> None:
        self.own.record(ident, state)
        if not 0 < ident < MAX_IDS:
            return
        version = DELETED if state is None else state[1]
        with self.shared.committed.get_lock():
            if self.shared.committed[ident] < version:
                self.shared.committed[ident] = version
        if state is not None:
            with self.shared.max_id.get_lock():
                if self.shared.max_id.value < ident:
                    self.shared.max_id.value = ident

    def pick_id(self, rng: random.Random) -> int:
        hi = max(1, min(int(self.shared.max_id.value), MAX_IDS - 1))
        ident = rng.randint(1, hi)
        for _ in range(8):  # prefer ids not known to be deleted
            if self.committed(ident) != DELETED:
                break
            ident = rng.randint(1, hi)
        return ident

    def db_row(self, ident: int) -> RowState | None:
        with self.Plain() as s:
            return _state(s.get(Item, ident))

    # -- checks -------------------------------------------------------------------------------

    def check_row(
        self,
        c: Counter[str],
        what: str,
        ident: int,
        got: RowState | None,
        own: tuple[int, int, str, bool] | None,
        seen: int,
        expected_group: int | None = None,
    ) -> None:
        """``got`` for ``ident`` (None: absent from a get, or from the list of ``expected_group``),
        against this process's own last commit ``own`` and the shared version ``seen``, both
        recorded before the read started."""
        stale: tuple[str, str] | None = None  # (kind, what was expected)
        if own is not None:
            group, version, value, deleted = own
            if deleted:
                if got is not None:
                    stale = ("deleted row returned", "none: this process deleted it")
            elif got is not None:
                if got[1] < version or (got[1] == version and got != (group, version, value)):
                    stale = ("older version", f"own commit {(group, version, value)}")
            elif expected_group is None or expected_group == group:
                # Absent: wrong only if the row still is as this process left it, now after the read.
                now = self.db_row(ident)
                if now == (group, version, value):
                    stale = ("row missing", f"own commit {now}, still in the database")
        if stale is not None:
            c["stale_own"] += 1
            c[f"stale_own.{stale[0]}"] += 1
            message = f"{what} id={ident} returned {got}; expected {stale[1]}"
            self.report(f"STALE AFTER OWN COMMIT ({stale[0]})", message)
        if got is not None and seen and (seen == DELETED or got[1] < seen):
            c["stale_cross"] += 1
            shown = "deleted" if seen == DELETED else f"version {seen}"
            self.report("cross-process stale", f"{what} id={ident} got {got}; {shown} was committed")

    def read_failed(self, c: Counter[str], what: str, exc: BaseException) -> None:
        c["read_exceptions"] += 1
        self.report(
            "READ EXCEPTION",
            f"{what}: {''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))}",
        )

    # -- operations ---------------------------------------------------------------------------

    def op_get(self, c: Counter[str], rng: random.Random) -> None:
        ident = self.pick_id(rng)
        own, seen = self.own.get(ident), self.committed(ident)
        c["reads"] += 1
        try:
            with self.Session() as s:
                got = _state(s.get(Item, ident))
        except Exception as exc:
            self.read_failed(c, f"get({ident})", exc)
            return
        self.check_row(c, "get", ident, got, own, seen)

    def op_list(self, c: Counter[str], rng: random.Random) -> None:
        group = rng.randint(1, GROUPS)
        own, seen = self.own.snapshot(), self.committed_all()
        c["reads"] += 1
        stmt = select(Item).where(Item.group_id == group).order_by(Item.id)
        try:
            with self.Session() as s:
                got: dict[int, RowState] = {
                    item.id: (item.group_id, item.version, item.value) for item in s.scalars(stmt)
                }
                order = list(got)
        except Exception as exc:
            self.read_failed(c, f"list(group={group})", exc)
            return
        if order != sorted(order) or any(state[0] != group for state in got.values()):
            c["malformed"] += 1
            self.report("MALFORMED RESULT", f"list(group={group}) returned {got}")
        for ident in set(got) | set(own):
            self.check_row(
                c,
                f"list(group={group})",
                ident,
                got.get(ident),
                own.get(ident),
                seen[ident] if ident < len(seen) else 0,
                expected_group=group,
            )

    def op_count(self, c: Counter[str], rng: random.Random) -> None:
        group = rng.randint(1, GROUPS)
        c["reads"] += 1
        stmt = select(func.count()).select_from(Item).where(Item.group_id == group)
        try:
            with self.Session() as s:
                n = s.scalar(stmt)
        except Exception as exc:
            self.read_failed(c, f"count(group={group})", exc)
            return
        if not isinstance(n, int) or n < 0:
            c["malformed"] += 1
            self.report("MALFORMED RESULT", f"count(group={group}) returned {n!r}")

    def op_write(self, c: Counter[str], rng: random.Random, kind: str, n: int) -> None:
        ident = self.pick_id(rng)
        for _ in range(WRITE_ATTEMPTS):
            try:
                if self._write_once(c, rng, kind, ident, n):
                    return
            except (StaleDataError, DBAPIError) as exc:
                # A concurrent write or delete got there first, or SQLite was busy: try again.
                c["write_conflicts"] += 1
                c[f"write_conflicts.{type(exc).__name__}"] += 1
            except _ReadFailed:
                return
            except Exception as exc:
                c["write_exceptions"] += 1
                self.report(
                    "UNEXPECTED WRITE EXCEPTION",
                    "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                )
                return

    def _write_once(self, c: Counter[str], rng: random.Random, kind: str, ident: int, n: int) -> bool:
        value = f"{os.getpid()}-{n}"
        with self.Session() as s:
            if kind in ("insert", "delete"):
                rows = s.scalar(select(func.count()).select_from(Item), execution_options={"cache": False})
                if (kind == "insert" and rows >= MAX_ROWS) or (kind == "delete" and rows <= MIN_ROWS):
                    kind = "update"
            if kind == "insert":
                item = Item(group_id=rng.randint(1, GROUPS), version=1, value=value)
                s.add(item)
                s.flush()
                ident, state = item.id, _state(item)
                s.commit()
                self.record(ident, state)
                c["writes"] += 1
                c["writes.insert"] += 1
                return True
            # Load it through the cache, as an application would (a read like any other).
            own, seen = self.own.get(ident), self.committed(ident)
            c["reads"] += 1
            try:
                item = s.get(Item, ident)
                got = _state(item)
            except Exception as exc:
                self.read_failed(c, f"get({ident}) before {kind}", exc)
                raise _ReadFailed from exc
            self.check_row(c, f"get before {kind}", ident, got, own, seen)
            if item is None:
                return True  # deleted meanwhile: nothing to write
            if kind == "delete":
                s.delete(item)
                s.commit()
                self.record(ident, None)
            else:
                item.version = item.version + 1
                if kind == "move":
                    item.group_id = rng.choice([g for g in range(1, GROUPS + 1) if g != item.group_id])
                else:
                    item.value = value
                state = _state(item)
                s.commit()
                self.record(ident, state)
            c["writes"] += 1
            c[f"writes.{kind}"] += 1
            return True

    # -- the run ------------------------------------------------------------------------------

    def thread_main(self, tid: int) -> None:
        rng = random.Random(self.cfg["seed"] * 1_000_003 + self.index * 1009 + tid)
        c: Counter[str] = Counter()
        n = 0
        try:
            while not self.shared.stop.is_set():
                op = rng.choices(OPS, WEIGHTS)[0]
                n += 1
                if op == "get":
                    self.op_get(c, rng)
                elif op == "list":
                    self.op_list(c, rng)
                elif op == "count":
                    self.op_count(c, rng)
                else:
                    self.op_write(c, rng, op, n)
        except Exception as exc:  # a bug of the soak itself: fail loudly
            c["harness_errors"] += 1
            self.report(
                "HARNESS ERROR", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            )
        finally:
            self.add(c)

    def deliver_pending(self) -> dict[str, Any]:
        """Deliver the invalidations kept during outages (10 s at most), then let the breaker close."""
        retry = getattr(self.cache, "retry_pending", None)
        started = time.monotonic()
        delivered = False
        if retry is not None:
            while time.monotonic() - started < 10:
                if retry():
                    delivered = True
                    break
                time.sleep(0.05)
        else:
            time.sleep(2)  # an sqlacache without retry_pending: a read delivers them (below)
        # A breaker still open (or half-open) after the last outage would make the final check read
        # around the cache; a read lets it probe Redis. Nothing else is written or read meanwhile.
        settled = time.monotonic()
        closed = False
        while time.monotonic() - settled < 10:
            st = self.cache.stats()
            if not st.get("pending_invalidations") and st.get("breaker", "closed") == "closed":
                closed = True
                break
            with self.Session() as s:
                s.get(Item, 1)
            time.sleep(0.05)
        st = self.cache.stats()
        return {
            "retry_pending": retry is not None,
            "delivered": delivered or (retry is None and not st.get("pending_invalidations")),
            "settled": closed,
            "pending_after": st.get("pending_invalidations"),
            "seconds": round(time.monotonic() - started, 2),
        }

    def verify(self) -> tuple[int, list[int]]:
        """Read every row, list and count through the cache twice; compare with the database."""
        with self.Plain() as s:
            top = max(int(s.scalar(select(func.max(Item.id))) or 0), int(self.shared.max_id.value))
            db_rows = {item.id: _state(item) for item in s.scalars(select(Item))}
        mismatches = 0
        hits = []
        for pass_no in (1, 2):
            before = self.cache.stats().get("hits", 0)
            for ident in range(1, top + 2):
                with self.Session() as s:
                    got = _state(s.get(Item, ident))
                if got != db_rows.get(ident):
                    mismatches += 1
                    self.report(
                        "FINAL MISMATCH", f"pass {pass_no} get({ident}): {got} != {db_rows.get(ident)}"
                    )
            for group in range(1, GROUPS + 1):
                stmt = select(Item).where(Item.group_id == group).order_by(Item.id)
                want = [(i, st) for i, st in sorted(db_rows.items()) if st is not None and st[0] == group]
                with self.Session() as s:
                    got_list = [(item.id, _state(item)) for item in s.scalars(stmt)]
                if got_list != want:
                    mismatches += 1
                    self.report("FINAL MISMATCH", f"pass {pass_no} list({group}): {got_list} != {want}")
                count = select(func.count()).select_from(Item).where(Item.group_id == group)
                with self.Session() as s:
                    got_n = s.scalar(count)
                if got_n != len(want):
                    mismatches += 1
                    self.report("FINAL MISMATCH", f"pass {pass_no} count({group}): {got_n} != {len(want)}")
            hits.append(self.cache.stats().get("hits", 0) - before)
        return mismatches, hits

    def run(self) -> dict[str, Any]:
        self.shared.start_barrier.wait(60)
        threads = [
            threading.Thread(target=self.thread_main, args=(t,), name=f"soak-{t}", daemon=True)
            for t in range(self.cfg["threads"])
        ]
        for t in threads:
            t.start()
        self.shared.stop.wait()
        for t in threads:
            t.join(30)
        stuck = sum(t.is_alive() for t in threads)
        run_stats = self.cache.stats()
        delivery = self.deliver_pending()
        result: dict[str, Any] = {
            "index": self.index,
            "stuck_threads": stuck,
            "run_stats": run_stats,
            "delivery": delivery,
        }
        try:
            self.shared.verify_barrier.wait(20)
        except threading.BrokenBarrierError:
            result["verify"] = "barrier broken"
        else:
            mismatches, hits = self.verify()
            result["mismatches"] = mismatches
            result["verify_hits"] = hits
        result["counts"] = dict(self.counts)
        result["final_stats"] = self.cache.stats()
        self.cache.close()
        self.engine.dispose()
        self.plain_engine.dispose()
        return result


class _ReadFailed(Exception):
    pass


class _ShowBugs(logging.Filter):
    """Without --verbose, only sqlacache log records with a traceback (its internal errors)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.exc_info is not None or record.levelno >= logging.ERROR


def worker_main(cfg: dict[str, Any], shared: Shared) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[soak p{cfg['index']}] %(name)s %(levelname)s: %(message)s"))
    handler.addFilter(_ShowBugs(cfg["verbose"]))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)

    # Never outlive the parent or the run's hard deadline.
    parent = os.getppid()

    def watchdog() -> None:
        while True:
            if os.getppid() != parent or time.time() > cfg["hard_deadline"]:
                print(f"[soak p{cfg['index']}] watchdog: giving up", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watchdog, daemon=True).start()
    result: dict[str, Any]
    try:
        worker = Worker(cfg, shared)
        result = worker.run()
    except BaseException as exc:
        result = {"index": cfg["index"], "crashed": "".join(traceback.format_exception(exc))}
    shared.results.put(result)


# ---------------------------------------------------------------------------------------------
# The parent


@dataclass
class Chaos:
    server: Any
    rng: random.Random
    restarts: int = 0
    pauses: int = 0
    paused_seconds: float = 0.0

    def run(self, until: float, alive: Callable[[], bool]) -> None:
        while True:
            wait = self.rng.uniform(0.3, 2.0)
            if time.monotonic() + wait >= until:
                time.sleep(max(0.0, until - time.monotonic()))
                return
            time.sleep(wait)
            if not alive():
                return
            if self.rng.random() < 0.4:
                self.server.restart(keep_data=False)
                self.restarts += 1
            else:
                pause = self.rng.uniform(0.1, 1.5)
                self.server.pause()
                try:
                    time.sleep(pause)
                finally:
                    self.server.resume()
                self.pauses += 1
                self.paused_seconds += pause


def _detail(counts: Counter[str], name: str) -> str:
    """``name``'s count, followed by its ``name.<kind>`` counts in parentheses."""
    parts = [f"{k.split('.', 1)[1]} {v}" for k, v in sorted(counts.items()) if k.startswith(f"{name}.")]
    return f"{counts[name]}" + (f" ({', '.join(parts)})" if parts else "")


def _sum(results: list[dict[str, Any]], section: str, key: str) -> int:
    return sum(int(r.get(section, {}).get(key, 0) or 0) for r in results)


def soak(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    rng = random.Random(seed)
    ctx = mp.get_context("spawn")
    failures: list[str] = []
    server = RedisServer()
    procs: list[Any] = []
    results: list[dict[str, Any]] = []
    chaos = Chaos(server, rng)
    started = time.monotonic()
    run_seconds = 0.0
    try:
        server.start()
        with database(args.db) as db:
            shared = Shared(
                committed=ctx.Array("q", MAX_IDS),
                max_id=ctx.Value("q", INITIAL_ROWS),
                stop=ctx.Event(),
                start_barrier=ctx.Barrier(args.processes + 1),
                verify_barrier=ctx.Barrier(args.processes),
                results=ctx.Queue(),
            )
            for ident in range(1, INITIAL_ROWS + 1):
                shared.committed[ident] = 1
            hard_deadline = time.time() + args.duration + args.grace + 30
            prefix = f"sqlacache-soak-{uuid.uuid4().hex[:10]}"  # one for all: they share the cache
            for index in range(args.processes):
                cfg = {
                    "index": index,
                    "db": db,
                    "redis_url": server.url,
                    "prefix": prefix,
                    "threads": args.threads,
                    "seed": seed,
                    "verbose": args.verbose,
                    "hard_deadline": hard_deadline,
                }
                p = ctx.Process(target=worker_main, args=(cfg, shared), name=f"soak-{index}", daemon=True)
                p.start()
                procs.append(p)
            try:
                shared.start_barrier.wait(60)
            except threading.BrokenBarrierError:
                failures.append("workers did not start")
                shared.stop.set()
            else:
                began = time.monotonic()
                try:
                    alive = lambda: all(p.is_alive() for p in procs)
                    if args.no_chaos:
                        while time.monotonic() < began + args.duration and alive():
                            time.sleep(0.1)
                    else:
                        chaos.run(began + args.duration, alive)
                finally:
                    server.resume()
                    run_seconds = time.monotonic() - began
                    shared.stop.set()
            if not all(p.is_alive() for p in procs) and not failures:
                failures.append("a worker process died during the run")
            deadline = time.monotonic() + args.grace
            while len(results) < args.processes and time.monotonic() < deadline:
                try:
                    results.append(shared.results.get(timeout=0.5))
                except Exception:
                    if not any(p.is_alive() for p in procs):
                        with suppress(Exception):
                            while True:
                                results.append(shared.results.get_nowait())
                        break
            for p in procs:
                p.join(max(0.1, deadline - time.monotonic()))
            if len(results) < args.processes:
                failures.append(f"only {len(results)} of {args.processes} processes reported")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        server.resume()
        server.close()

    for r in results:
        if "crashed" in r:
            failures.append(f"process {r['index']} crashed:\n{r['crashed']}")
        if r.get("stuck_threads"):
            failures.append(f"process {r['index']}: {r['stuck_threads']} threads did not stop")
        if r.get("verify") == "barrier broken":
            failures.append(f"process {r['index']}: the final check did not run (barrier broken)")
        if r.get("delivery") and not r["delivery"]["delivered"]:
            failures.append(f"process {r['index']}: pending invalidations not delivered: {r['delivery']}")
        elif r.get("delivery") and not r["delivery"]["settled"]:
            failures.append(f"process {r['index']}: the cache did not settle after the run: {r['delivery']}")

    counts: Counter[str] = Counter()
    for r in results:
        counts.update(r.get("counts", {}))
    mismatches = sum(int(r.get("mismatches", 0)) for r in results)
    hits, misses = _sum(results, "run_stats", "hits"), _sum(results, "run_stats", "misses")
    internal = _sum(results, "final_stats", "errors.internal")
    if internal:
        failures.append(f"sqlacache reported {internal} internal errors (errors.internal)")
    dead = [r["index"] for r in results if "verify_hits" in r and not r["verify_hits"][-1]]
    if dead:
        failures.append(f"processes {dead}: no cache hit on the second pass of the final check")
    if counts["harness_errors"]:
        failures.append(f"{counts['harness_errors']} errors in the soak's own code")

    rows = [
        ("database", args.db),
        ("seed", seed),
        ("duration", f"{run_seconds:.1f} s (total {time.monotonic() - started:.1f} s)"),
        ("processes x threads", f"{args.processes} x {args.threads}"),
        ("reads", counts["reads"]),
        (
            "writes",
            f"{counts['writes']} (update {counts['writes.update']}, move {counts['writes.move']}, "
            f"insert {counts['writes.insert']}, delete {counts['writes.delete']})",
        ),
        ("write conflicts retried", _detail(counts, "write_conflicts")),
        ("hit ratio", f"{100 * hits / max(1, hits + misses):.1f} % ({hits} hits, {misses} misses)"),
        ("redis restarts", chaos.restarts),
        ("redis pauses", f"{chaos.pauses} ({chaos.paused_seconds:.1f} s paused)"),
        ("read exceptions", counts["read_exceptions"]),
        ("unexpected write exceptions", counts["write_exceptions"]),
        ("malformed results", counts["malformed"]),
        ("stale after own commit", _detail(counts, "stale_own")),
        ("cross-process stale", f"{counts['stale_cross']} (reported, not asserted)"),
        ("final mismatches", mismatches),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\nsqlacache soak ({'retry_pending' if _has_retry() else 'no retry_pending: slept'})")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    header = ("proc", "reads", "writes", "hits", "misses", "errors", "internal", "pending", "delivered",
              "breaker", "verify hits")  # fmt: skip
    table = [header]
    for r in sorted(results, key=lambda r: r["index"]):
        st, c = r.get("run_stats", {}), r.get("counts", {})
        d = r.get("delivery", {})
        table.append(
            (
                str(r["index"]),
                str(c.get("reads", "-")),
                str(c.get("writes", "-")),
                str(st.get("hits", "-")),
                str(st.get("misses", "-")),
                str(st.get("errors", "-")),
                str(st.get("errors.internal", 0)),
                f"{st.get('pending_invalidations', '-')}->{d.get('pending_after', '-')}",
                f"{d.get('delivered', '-')} {d.get('seconds', '')}s",
                str(r.get("final_stats", st).get("breaker", "n/a")),
                "/".join(str(h) for h in r.get("verify_hits", [])) or "-",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print("  per process (errors, pending at the end of the run -> after delivery, breaker after the check):")
    for row in table:
        print("    " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)))

    if args.stats:
        for r in sorted(results, key=lambda r: r["index"]):
            for when in ("run_stats", "final_stats"):
                print(f"  p{r['index']} {when}: {r.get(when)}")

    bad = {
        "read exceptions": counts["read_exceptions"],
        "unexpected write exceptions": counts["write_exceptions"],
        "malformed results": counts["malformed"],
        "stale reads after own commit": counts["stale_own"],
        "final mismatches": mismatches,
    }
    failures += [f"{name}: {n}" for name, n in bad.items() if n]
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures), flush=True)
        return 1
    print("\nOK", flush=True)
    return 0


def _has_retry() -> bool:
    from sqlacache import Cache

    return hasattr(Cache, "retry_pending")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos (default 60)")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4, help="worker threads per process")
    parser.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--seed", type=int, default=None, help="seed of the chaos and the workers")
    parser.add_argument(
        "--grace", type=float, default=30.0, help="seconds the workers get to finish after the run"
    )
    parser.add_argument("--verbose", action="store_true", help="show sqlacache's warnings")
    parser.add_argument("--stats", action="store_true", help="print every process's cache.stats()")
    parser.add_argument("--no-chaos", action="store_true", help="leave Redis alone (a baseline)")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    # SIGTERM (a test's timeout) unwinds like Ctrl-C: workers killed, Redis stopped, schema dropped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
