#!/usr/bin/env python
"""Redis Cluster: how a multi-table workload spreads over the nodes, and what a lookup costs on a
cluster against one Redis.

Starts a throwaway 3-master cluster and a throwaway single redis-server on loopback (needs
``redis-server`` on the PATH; run from the repository root)::

    .venv/bin/python benchmarks/bench_cluster.py [--tables N] [--steps N]

Workload (the backend contract directly, as the cache drives it): 90 % hinted lookups of 300 keys
each depending on ``*``, ``d:main`` and one table (or a row and ``a:`` of another table), with a
store after each miss; 10 % writes bumping a table and a row with a row image. Printed: each
node's share of the keys and of the commands it ran (``INFO commandstats``), then the mean cost of
a hit and of a miss (lookup + store), cluster vs one Redis.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis
import redis.cluster

from sqlacache.backends import RedisBackend
from sqlacache.backends.redis.cluster import RedisClusterBackend
from tests.cluster import RedisClusterProcs
from tests.faults import LOOPBACK, RedisServer

TTL = 600.0


def workload(backend: Any, tables: int, steps: int, seed: int = 3) -> None:
    rnd = random.Random(seed)
    names = [f"tbl{i}" for i in range(tables)]
    for step in range(steps):
        table = rnd.choice(names)
        if rnd.random() < 0.1:
            row = rnd.randrange(50)
            backend.bump([f"t:{table}", f"r:{table}:{row}"], [(table, {"id": str(row)}, None)])
            continue
        k = rnd.randrange(300)
        deps = ["*", "d:main", f"t:{names[k % tables]}"]
        if k % 3 == 0:
            other = names[(k + 5) % tables]
            deps = ["*", "d:main", f"a:{other}", f"r:{other}:{k % 50}"]
        found = backend.lookup(f"q{k}", deps)
        if found.entry is None:
            backend.store(f"q{k}", b"payload-%d" % step, deps, found.generation, TTL)


def costs(backend: Any, n: int = 2000) -> tuple[float, float]:
    """Mean µs of a hit (hinted lookup) and of a miss (hinted lookup + store)."""
    deps = ["*", "d:main", "t:users", "r:orders:1", "a:orders"]
    g = backend.lookup("hit", deps).generation
    backend.store("hit", b"x" * 200, deps, g, TTL)
    backend.lookup("hit", deps)
    t0 = time.perf_counter()
    for _ in range(n):
        assert backend.lookup("hit", deps).entry is not None
    hit = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for i in range(n):
        found = backend.lookup(f"miss{i}", deps)
        backend.store(f"miss{i}", b"x" * 200, deps, found.generation, TTL)
    miss = (time.perf_counter() - t0) / n * 1e6
    return hit, miss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=12)
    parser.add_argument("--steps", type=int, default=5000)
    args = parser.parse_args()
    cluster = RedisClusterProcs()
    single = RedisServer()
    try:
        cluster.start()
        single.start()
        client = redis.cluster.RedisCluster(LOOPBACK, cluster.ports[0])
        backend = RedisClusterBackend(client, prefix="bench")
        for i in range(len(cluster.servers)):
            cluster.node(i).config_resetstat()
        workload(backend, args.tables, args.steps)
        rows = []
        for i in range(len(cluster.servers)):
            node = cluster.node(i)
            calls = sum(int(v["calls"]) for k, v in node.info("commandstats").items() if k != "cmdstat_info")
            rows.append((cluster.ports[i], int(node.dbsize()), calls))
            node.close()
        keys = sum(r[1] for r in rows)
        calls = sum(r[2] for r in rows)
        print(f"\n{args.tables} tables, {args.steps} steps (90 % reads, 10 % writes)\n")
        print("| node | keys | share of keys | commands | share of commands |")
        print("|---|---:|---:|---:|---:|")
        for port, k, c in rows:
            print(f"| :{port} | {k} | {k / keys:.0%} | {c} | {c / calls:.0%} |")
        single_client = redis.Redis.from_url(single.url)
        print("\n| backend | hit (µs) | miss: lookup + store (µs) |")
        print("|---|---:|---:|")
        for name, b in (
            ("one Redis (RedisBackend)", RedisBackend(single_client, prefix="bench")),
            ("3-master cluster (RedisClusterBackend)", backend),
        ):
            hit, miss = costs(b)
            print(f"| {name} | {hit:.0f} | {miss:.0f} |")
        client.close()
        single_client.close()
    finally:
        cluster.close()
        single.close()


if __name__ == "__main__":
    main()
