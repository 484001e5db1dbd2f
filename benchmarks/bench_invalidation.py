#!/usr/bin/env python
"""Invalidation benchmark: ``invalidation="conditions"`` vs ``"tables"`` vs no cache, mixed reads and writes.

One table of users (indexed ``group_id`` in 100 groups, unique ``name``, ``score``), seeded once and
restored before each mode. One operation sequence, generated from ``--seed``, is run by every mode:

* ``plain``       a plain ``Session``, no cache: the baseline;
* ``tables``      ``CachingSession`` with ``Cache(invalidation="tables")``: a write evicts every cached
                  read of its table (``get`` included);
* ``conditions``  ``CachingSession`` with ``Cache(invalidation="conditions")`` (the default): a write
                  evicts the reads whose WHERE its old or new values match.

Reads (Zipf-skewed keys): ``get`` = ``session.get(User, id)``; ``group list`` = the 20 best scores of a
group; ``group count`` = ``count()`` of a group; ``by name`` = ``select(User).where(User.name == n)``.
Writes: load a user with ``session.get``, change ``score`` (or, for ``--move-ratio`` of them, move it
to another group), commit. Each operation opens and closes its own session, inside the timed region.

Correctness: every ``--verify-every``-th read is compared with the same read through a plain
``Session`` (no cache involved), under a lock that keeps writers out between the two reads; at the end,
every group's list and count and every user read during the run are read once more through the cache
and compared the same way. Mismatches must be 0. Run from the repository root:

    .venv/bin/python benchmarks/bench_invalidation.py [--backend memory|redis] [--db sqlite|postgres] ...
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

import redis
import sqlalchemy
from sqlalchemy import String, create_engine, delete, event, func, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlacache import Cache, CachingSession

PG_URL = os.environ.get("SQLACACHE_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SQLACACHE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")

GROUPS = 100
LIST_LIMIT = 20
READS = {"get": 50, "group list": 20, "group count": 15, "by name": 15}  # kind → weight among reads
KINDS = [*READS, "update score", "update group"]
MODES = ("plain", "tables", "conditions")


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "bench_inv_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(String(40), unique=True)
    score: Mapped[int]


def name_of(uid: int) -> str:
    return f"user-{uid:06d}"


def statement(kind: str, arg: int) -> Any:
    if kind == "group list":
        return select(User).where(User.group_id == arg).order_by(User.score.desc(), User.id).limit(LIST_LIMIT)
    if kind == "group count":
        return select(func.count()).select_from(User).where(User.group_id == arg)
    return select(User).where(User.name == name_of(arg))


def row(u: User | None) -> tuple[Any, ...] | None:
    return None if u is None else (u.id, u.group_id, u.name, u.score)


def read(s: Session, kind: str, arg: int) -> Any:
    """What the read returned, as plain values (compared with the uncached read)."""
    if kind == "get":
        return row(s.get(User, arg))
    if kind == "group count":
        return s.scalar(statement(kind, arg))
    return [row(u) for u in s.scalars(statement(kind, arg))]


def write(s: Session, kind: str, uid: int, value: int) -> None:
    u = s.get(User, uid)
    assert u is not None
    if kind == "update score":
        u.score = value
    else:  # move to another group (value, or the next one if the user is already there)
        u.group_id = value if value != u.group_id else value % GROUPS + 1
    s.commit()


# ---------------------------------------------------------------------------------------------
# The workload: seed rows and one operation sequence, both from --seed.


def seed_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    return [
        {"id": i, "group_id": rng.randint(1, GROUPS), "name": name_of(i), "score": rng.randint(0, 10**6)}
        for i in range(1, args.rows + 1)
    ]


def make_ops(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(kind, key, value): keys are Zipf-distributed, the hot ones scattered over the key space."""
    rng = random.Random(args.seed + 1)

    def zipf(n: int) -> tuple[list[int], list[float]]:
        keys = list(range(1, n + 1))
        rng.shuffle(keys)
        return keys, list(itertools.accumulate(1.0 / k**args.zipf for k in range(1, n + 1)))

    users, groups = zipf(args.rows), zipf(GROUPS)
    kinds, weights = list(READS), list(READS.values())
    ops = []
    for _ in range(args.ops):
        uid = rng.choices(users[0], cum_weights=users[1])[0]
        if rng.random() < args.write_ratio:
            if rng.random() < args.move_ratio:
                ops.append(("update group", uid, rng.randint(1, GROUPS)))
            else:
                ops.append(("update score", uid, rng.randint(0, 10**6)))
        else:
            kind = rng.choices(kinds, weights)[0]
            key = rng.choices(groups[0], cum_weights=groups[1])[0] if "group" in kind else uid
            ops.append((kind, key, 0))
    return ops


# ---------------------------------------------------------------------------------------------
# Databases.


def make_engine(args: argparse.Namespace, where: str) -> Any:
    if args.db == "postgres":
        return create_engine(PG_URL, connect_args={"options": f"-csearch_path={where}"})
    engine = create_engine(f"sqlite:///{where}", connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _pragmas(conn: Any, _: Any) -> None:
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL (set at creation) + one fsync per checkpoint

    return engine


def create_database(args: argparse.Namespace, run_id: str) -> str:
    if args.db == "postgres":
        where = f"sqlacache_bench_{run_id}"
        admin = create_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{where}"'))
        admin.dispose()
    else:
        where = os.path.join(tempfile.gettempdir(), f"sqlacache_bench_{run_id}.sqlite3")
    engine = make_engine(args, where)
    if args.db == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    Base.metadata.create_all(engine)
    engine.dispose()
    return where


def restore(engine: Any, rows: list[dict[str, Any]]) -> None:
    """Put the seed rows back (Core on a connection: no session, no cache is alive at this point)."""
    with engine.begin() as conn:
        conn.execute(delete(User))
        conn.execute(insert(User), rows)
    with engine.connect() as conn:
        conn.execute(text(f"ANALYZE {User.__tablename__}"))
        conn.commit()


def drop_database(args: argparse.Namespace, where: str) -> None:
    if args.db == "postgres":
        admin = create_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{where}" CASCADE'))
        admin.dispose()
    else:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(where + suffix):
                os.remove(where + suffix)


class SqlCounter:
    """SQL statements sent by the current thread (a before_cursor_execute listener)."""

    def __init__(self, engine: Any) -> None:
        self.local = threading.local()
        event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, *_: Any) -> None:
        self.local.n = getattr(self.local, "n", 0) + 1

    def get(self) -> int:
        return getattr(self.local, "n", 0)


# ---------------------------------------------------------------------------------------------
# One mode.


def run_mode(
    mode: str, args: argparse.Namespace, where: str, rows: list[dict[str, Any]], ops: list[Any], prefix: str
) -> dict[str, Any]:
    engine = make_engine(args, where)
    restore(engine, rows)
    sql = SqlCounter(engine)
    cache = None
    if mode == "plain":
        Sessions: Any = sessionmaker(engine)
    else:
        backend = REDIS_URL if args.backend == "redis" else "memory://"
        cache = Cache(backend=backend, prefix=f"{prefix}-{mode}", invalidation=mode, max_entries=10**6)
        Sessions = sessionmaker(engine, class_=CachingSession, cache=cache)
    lock = threading.Lock()  # writers vs a sampled read and its check: nothing commits in between
    deadline = time.perf_counter() + args.seconds if args.seconds else None
    samples: dict[str, list[tuple[int, int]]] = defaultdict(list)  # kind → (ns, SQL statements sent)
    out = {"sql": 0, "checked": 0, "mismatches": 0, "done": 0, "verify_s": 0.0}
    log: list[tuple[int, str, int, Any]] = []  # no cache: every read's result, for the ceilings

    def worker(start: int) -> None:
        mine: dict[str, list[tuple[int, int]]] = defaultdict(list)
        checked = mismatches = verify_ns = 0
        for index in range(start, len(ops), args.threads):
            if deadline is not None and time.perf_counter() > deadline:
                break
            kind, key, value = ops[index]
            is_write = kind.startswith("update")
            verify = not is_write and index % args.verify_every == 0
            held = lock.acquire() if is_write or verify else False
            try:
                before = sql.get()
                t0 = time.perf_counter_ns()
                with Sessions() as s:
                    if is_write:
                        write(s, kind, key, value)
                    else:
                        got = read(s, kind, key)
                t1 = time.perf_counter_ns()
                n_sql = sql.get() - before
                if cache is None and not is_write:
                    log.append((index, kind, key, got))
                if verify:
                    with Session(engine) as s:
                        checked += 1
                        mismatches += got != read(s, kind, key)
                    verify_ns += time.perf_counter_ns() - t1
            finally:
                if held:
                    lock.release()
            mine[kind].append((t1 - t0, n_sql))
        with lock:
            for k, v in mine.items():
                samples[k] += v
                out["sql"] += sum(n for _, n in v)
                out["done"] += len(v)
            out["checked"] += checked
            out["mismatches"] += mismatches
            out["verify_s"] += verify_ns / 1e9

    print(f"  {mode}: running {len(ops)} operations ...", file=sys.stderr)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(args.threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stats = cache.stats() if cache is not None else {}

    # Final sweep: what the cache may still hold for every group and every user of the sequence, vs the DB.
    swept = bad = 0
    keys = {(k, g) for k in ("group list", "group count") for g in range(1, GROUPS + 1)}
    keys |= {(k, key) for k, key, _ in ops if k in ("get", "by name")}
    for kind, key in sorted(keys) if cache is not None else ():
        with Sessions() as s:
            got = read(s, kind, key)
        with Session(engine) as s:
            bad += got != read(s, kind, key)
        swept += 1
    left = None
    if cache is not None:
        cache.invalidate_all()
        if args.backend == "redis":
            client = redis.Redis.from_url(REDIS_URL, socket_timeout=0.5, socket_connect_timeout=0.5)
            left = sum(1 for _ in client.scan_iter(match=f"{prefix}-{mode}:*", count=1000))
            client.close()
        cache.close()
    engine.dispose()
    busy = wall - out["verify_s"] / args.threads
    return {
        **out,
        "mode": mode,
        "wall": wall,
        "ops_s": out["done"] / busy,
        "stats": stats,
        "samples": dict(samples),
        "log": log,
        "swept": swept,
        "swept_bad": bad,
        "left": left,
    }


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeats of one mode: the counters of the first (same sequence), every latency sample and
    check, the median throughput."""
    out = {**runs[0], "ops_s": statistics.median(r["ops_s"] for r in runs)}
    out["samples"] = {k: [x for r in runs for x in r["samples"].get(k, [])] for k in KINDS}
    for k in ("checked", "mismatches", "swept", "swept_bad"):
        out[k] = sum(r[k] for r in runs)
    out["left"] = sum(r["left"] or 0 for r in runs)
    return out


# ---------------------------------------------------------------------------------------------
# Report.


def render(headers: list[str], rows: list[list[str]], rst: bool = False) -> list[str]:
    """A Markdown pipe table, or a reStructuredText simple table."""
    if not rst:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [rule, line(headers), rule, *(line(r) for r in rows), rule]


def hit_rate(stats: dict[str, Any]) -> float | None:
    looked = stats.get("hits", 0) + stats.get("misses", 0)
    return stats["hits"] / looked if looked else None


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def share(part: int, whole: int) -> str:
    return pct(part / whole if whole else None)


def summary_table(results: list[dict[str, Any]], rst: bool = False) -> list[str]:
    headers = ["mode", "ops/s", "hit rate", "hits", "misses", "stores", "refused", "SQL", "SQL/op"]
    headers += ["checked", "mismatches"]
    rows = []
    for r in results:
        st = r["stats"]
        rows.append(
            [
                f"``{r['mode']}``" if rst else r["mode"],
                f"{r['ops_s']:.0f}",
                pct(hit_rate(st)),
                *(str(st[k]) if st else "—" for k in ("hits", "misses", "stores", "stores_refused")),
                str(r["sql"]),
                f"{r['sql'] / r['done']:.2f}",
                f"{r['checked']} + {r['swept']}",
                str(r["mismatches"] + r["swept_bad"]),
            ]
        )
    return render(headers, rows, rst)


def us(xs: list[int], q: float) -> str:
    return f"{xs[min(len(xs) - 1, int(q * len(xs)))] / 1000:.0f}" if xs else "—"


def latency_table(results: list[dict[str, Any]], rst: bool = False) -> list[str]:
    headers = ["operation", "mode", "n", "no SQL", "mean µs", "p50 µs", "p95 µs", "p50 hit", "p50 miss"]
    rows = []
    for kind in KINDS:
        for r in results:
            got = r["samples"].get(kind, [])
            if not got:
                continue
            xs = sorted(ns for ns, _ in got)
            hit = sorted(ns for ns, n in got if n == 0)
            miss = sorted(ns for ns, n in got if n > 0)
            rows.append(
                [
                    kind if rst or r is results[0] else "",  # rst: a blank first cell continues a row
                    f"``{r['mode']}``" if rst else r["mode"],
                    str(len(xs)),
                    share(len(hit), len(xs)),
                    f"{statistics.fmean(xs) / 1000:.0f}",
                    us(xs, 0.5),
                    us(xs, 0.95),
                    us(hit, 0.5),
                    us(miss, 0.5),
                ]
            )
    return render(headers, rows, rst)


def ceiling_table(results: list[dict[str, Any]], rst: bool = False) -> list[str]:
    """Per read kind: first reads of their key, and reads whose result equals the key's previous read
    (what a cache that evicts exactly the reads whose result changed would serve), from the plain run."""
    plain = next((r for r in results if r["log"]), None)
    if plain is None:
        return []
    n: dict[str, int] = defaultdict(int)
    first: dict[str, int] = defaultdict(int)
    same: dict[str, int] = defaultdict(int)
    last: dict[tuple[str, int], Any] = {}
    for _, kind, key, got in sorted(plain["log"], key=lambda x: x[0]):
        n[kind] += 1
        if (kind, key) not in last:
            first[kind] += 1
        elif last[kind, key] == got:
            same[kind] += 1
        last[kind, key] = got
    cached = [r for r in results if r["stats"]]
    headers = ["read", "n", "first read of its key", "result unchanged (ideal)"]
    headers += [f"no SQL: {r['mode']}" for r in cached]
    rows = []
    for kind in READS:
        no_sql = [[k == 0 for _, k in r["samples"].get(kind, [])] for r in cached]
        cells = [share(first[kind], n[kind]), share(same[kind], n[kind])]
        rows.append([kind, str(n[kind]), *cells, *(share(sum(x), len(x)) for x in no_sql)])
    return render(headers, rows, rst)


def plot(results: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed, {path} not written", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    reads = list(READS)
    width = 0.8 / len(results)
    for n, r in enumerate(results):
        p50 = [statistics.median([ns for ns, _ in r["samples"].get(k, [(0, 0)])]) / 1000 for k in reads]
        left.bar([i + n * width for i in range(len(reads))], p50, width, label=r["mode"])
        right.bar(n, r["ops_s"], label=r["mode"])
        rate = hit_rate(r["stats"])
        if rate is not None:
            right.annotate(f"hits {100 * rate:.0f} %", (n, r["ops_s"]), ha="center", va="bottom")
    left.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(reads))], reads)
    left.set_ylabel("p50 latency, µs")
    left.legend()
    right.set_xticks(range(len(results)), [r["mode"] for r in results])
    right.set_ylabel("operations / s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000, help="users (default 10000)")
    parser.add_argument("--ops", type=int, default=20_000, help="operations per mode (default 20000)")
    parser.add_argument("--seconds", type=float, default=0, help="also stop each mode after this long")
    parser.add_argument("--write-ratio", type=float, default=0.05, help="share of writes (default 0.05)")
    parser.add_argument(
        "--move-ratio", type=float, default=0.2, help="share of writes that change group_id (default 0.2)"
    )
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the key popularity")
    parser.add_argument("--backend", choices=("memory", "redis"), default="memory")
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--threads", type=int, default=1, help="concurrent workers (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="run every mode N times, in rotating order")
    parser.add_argument("--verify-every", type=int, default=20, help="check every N-th read (default 20)")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES)
    )
    parser.add_argument("--plot", metavar="PNG", help="also save a plot (needs matplotlib)")
    parser.add_argument("--rst", metavar="FILE", help="also write the tables as reStructuredText")
    parser.add_argument("--stats", action="store_true", help="also print each cache's full stats()")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes) or min(args.threads, args.verify_every, args.repeat) < 1:
        parser.error(f"--modes must name some of {MODES}; --threads, --verify-every, --repeat must be >= 1")

    run_id = uuid.uuid4().hex[:10]
    prefix = f"sqlacache-bench-inv-{run_id}"
    started = time.perf_counter()
    rows, ops = seed_rows(args), make_ops(args)
    where = create_database(args, run_id)
    counts = {k: sum(1 for o in ops if o[0] == k) for k in KINDS}
    print(f"sqlacache invalidation benchmark: {len(ops)} ops {counts}", file=sys.stderr)
    try:
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for n in range(args.repeat):  # the modes take turns, so machine noise hits them all alike
            for mode in modes[n % len(modes) :] + modes[: n % len(modes)]:
                runs[mode].append(run_mode(mode, args, where, rows, ops, f"{prefix}-{n}"))
        results = [merge(runs[mode]) for mode in modes]
    finally:
        drop_database(args, where)

    setup = (
        f"{args.db} + {args.backend} backend; {args.rows} users in {GROUPS} groups; {len(ops)} operations "
        f"({100 * args.write_ratio:g} % writes, {100 * args.move_ratio:g} % of them moving a user to "
        f"another group), Zipf {args.zipf:g}, seed {args.seed}, {args.threads} thread(s)"
    )

    def tables(rst: bool) -> list[str]:
        found = (summary_table(results, rst), latency_table(results, rst), ceiling_table(results, rst))
        return [line for t in found if t for line in ("", *t)]

    lines = [
        "## sqlacache invalidation benchmark",
        "",
        f"{setup}. Python {sys.version.split()[0]}, SQLAlchemy {sqlalchemy.__version__}, "
        f"{os.cpu_count()} CPUs, 1-min load average {os.getloadavg()[0]:.2f}; total run "
        f"{time.perf_counter() - started:.0f} s.",
        *tables(False),
        "",
        "hit rate = cache.stats() hits / (hits + misses), writes' session.get included. SQL = statements "
        "the workload sent (before_cursor_execute); no SQL = share of the operations that sent none (hits). "
        "checked = sampled reads + final sweep, each compared with a plain Session read. first read of its "
        "key / result unchanged: from the plain run, reads of a key not read before / reads whose result "
        "equals that key's previous read: what a cache evicting exactly the changed results would serve.",
    ]
    if args.backend == "redis":
        left = {r["mode"]: r["left"] for r in results if r["stats"]}
        lines.append(f"Keys left under the run's prefixes after cleanup: {left}.")
    if args.stats:
        lines += ["", *(f"- {r['mode']}: {r['stats']}" for r in results if r["stats"])]
    print("\n".join(lines))
    if args.rst:
        with open(args.rst, "w", encoding="utf-8") as f:
            f.write(f"{setup}.\n" + "\n".join(tables(True)) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0 if all(r["mismatches"] + r["swept_bad"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
