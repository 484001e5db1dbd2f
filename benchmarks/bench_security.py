"""What signing and encryption cost on a hit (docs/security.rst).

Two measurements, interleaved in blocks so machine noise hits every variant alike:

* ``seal open``: checking one stored entry (the MAC, or the AES-GCM decryption), alone, per entry,
  for payloads of a one-row and a 20-row read;
* ``get hit``: ``session.get`` served from the cache end to end (SQLite + ``memory://``, so that no
  network noise hides the difference), without a secret, with ``secret=``, with ``encryption_key=``.

    python benchmarks/bench_security.py            # 20000 iterations per cell
    python benchmarks/bench_security.py --quick    # a smoke run

Target: signing adds at most 5 µs per entry on a hit. Timings on a loaded machine are noisy: read
the medians, and compare variants of one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlacache import Cache, CachingSession
from sqlacache.security.seal import Seal


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "bench_security"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    email: Mapped[str] = mapped_column(String(120))


def _median_us(fn: Callable[[], object], iterations: int, blocks: int) -> list[float]:
    per_block = max(1, iterations // blocks)
    out = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            fn()
        out.append((time.perf_counter() - start) / per_block * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="500 iterations: a smoke run")
    args = parser.parse_args()
    iterations = 500 if args.quick else args.iterations
    blocks = 10

    try:
        import cryptography  # noqa: F401

        encryption = True
    except ImportError:
        encryption = False

    # -- the check alone, per entry
    seals = {"secret": Seal("bench", secret=os.urandom(32))}
    if encryption:
        seals["encryption_key"] = Seal("bench", encryption_key=os.urandom(32))
    sizes = {"1 row (200 B)": 200, "20 rows (4 KB)": 4000}
    seal_rows = []
    for label, size in sizes.items():
        inner = b"\xa7q" + os.urandom(size)
        timings: dict[str, list[float]] = {name: [] for name in seals}
        for _ in range(blocks):  # interleaved
            for name, seal in seals.items():
                stored = seal.close("q:0123456789abcdef0123456789abcdef01234567", inner)
                timings[name] += _median_us(
                    lambda s=seal, v=stored: s.open("q:0123456789abcdef0123456789abcdef01234567", v),
                    iterations // blocks,
                    1,
                )
        seal_rows.append((label, {n: statistics.median(t) for n, t in timings.items()}))

    # -- a get hit end to end
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(Row.__table__.insert(), [{"id": 1, "name": "ann", "email": "ann@example.com"}])
    caches = {"no secret": Cache("memory://"), "secret": Cache("memory://", secret=os.urandom(32))}
    if encryption:
        caches["encryption_key"] = Cache("memory://", encryption_key=os.urandom(32))
    for cache in caches.values():
        with CachingSession(engine, cache=cache) as s:
            s.get(Row, 1)

    def hit(cache: Cache) -> None:
        with CachingSession(engine, cache=cache) as s:
            s.get(Row, 1)

    hits: dict[str, list[float]] = {name: [] for name in caches}
    for _ in range(blocks):
        for name, cache in caches.items():
            hits[name] += _median_us(lambda c=cache: hit(c), max(1, iterations // 10 // blocks), 1)
    for name, cache in caches.items():
        stats = cache.stats()
        assert stats.get("tampered", 0) == 0 and stats["hits"] > 0, (name, stats)
        cache.close()

    print("Checking one entry on a hit (median µs per entry):\n")
    names = list(seals)
    print("| payload | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, cells in seal_rows:
        print(f"| {label} | " + " | ".join(f"{cells[n]:.2f}" for n in names) + " |")
    print("\nsession.get hit end to end, SQLite + memory:// (median µs):\n")
    base = statistics.median(hits["no secret"])
    print("| variant | µs | over no secret |")
    print("|---|---|---|")
    for name, samples in hits.items():
        m = statistics.median(samples)
        print(f"| {name} | {m:.1f} | {m - base:+.1f} |")
    if not encryption:
        print("\n(encryption_key not measured: pip install 'sqlacache[encryption]')")
    print("\nTarget: signing adds ≤ 5 µs per entry. On a loaded machine compare variants of one run only.")


if __name__ == "__main__":
    main()
