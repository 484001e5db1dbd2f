"""``ping`` and ``doctor``: is Redis there, and is it set up as a cache for sqlacache should be?

The advice follows from the backend contract (``backends/base.py``): a lost entry or version is a
miss, never a stale hit, so Redis may evict any sqlacache key under memory pressure — an
``allkeys-*`` policy is right for a Redis that only caches. ``volatile-*`` works too (every entry
and version sqlacache writes has a TTL), for a Redis that also holds data it must not evict.
``noeviction`` is safe but, once full, no result is stored any more. Persistence brings back old
data after a restart (detected and evicted by processes that saw newer data, not by the others):
a cache should restart empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis

from sqlacache.cli.server import OK, PROBLEMS, Target, shown


@dataclass
class Report:
    lines: list[tuple[str, str]] = field(default_factory=list)  # (level, text)

    def add(self, level: str, text: str) -> None:
        self.lines.append((level, text))

    @property
    def problems(self) -> int:
        return sum(1 for level, _ in self.lines if level in ("WARN", "FAIL"))


def ping(target: Target, rounds: int = 3) -> tuple[float, dict[str, Any]]:
    """The best round trip of a few PINGs (ms; one slow answer on a busy host is not the network's
    latency), and the server's INFO."""
    best = float("inf")
    for _ in range(rounds):
        began = time.perf_counter()
        target.call("PING")
        best = min(best, (time.perf_counter() - began) * 1000)
    info: dict[str, Any] = target.client.info("server")
    return best, info


def run_ping(target: Target) -> int:
    elapsed, info = ping(target)
    print(
        f"PONG from Redis {info.get('redis_version', '?')} at {shown(target.url)} "
        f"({info.get('redis_mode', 'standalone')}) in {elapsed:.2f} ms"
    )
    return OK


def _config(target: Target, name: str) -> str | None:
    try:
        reply = target.client.config_get(name)
    except redis.exceptions.ResponseError:  # CONFIG renamed or disabled (managed services)
        return None
    value = reply.get(name)
    return None if value is None else str(value)


def _policy(report: Report, policy: str | None, maxmemory: str | None) -> None:
    if policy is None or maxmemory is None:
        report.add(
            "WARN", "cannot read maxmemory / maxmemory-policy (CONFIG GET refused): check them by hand"
        )
        return
    if maxmemory == "0":
        # The policy only applies once there is a limit.
        report.add(
            "WARN",
            f"maxmemory is 0 (no limit; maxmemory-policy {policy} never applies): the cache grows until "
            "the host runs out of memory. Set a limit with a policy that evicts, e.g. "
            "CONFIG SET maxmemory 1gb and CONFIG SET maxmemory-policy allkeys-lru",
        )
        return
    if policy in ("allkeys-lru", "allkeys-lfu"):
        report.add("OK", f"maxmemory-policy {policy}: Redis evicts what is least used; a lost key is a miss")
    elif policy == "allkeys-random":
        report.add(
            "OK",
            "maxmemory-policy allkeys-random is safe (a lost key is a miss); allkeys-lru keeps more hits",
        )
    elif policy.startswith("volatile-"):
        report.add(
            "OK",
            f"maxmemory-policy {policy}: safe (every sqlacache entry and version has a TTL); "
            "allkeys-lru is better if this Redis holds nothing else",
        )
    elif policy == "noeviction":
        report.add(
            "WARN",
            "maxmemory-policy noeviction: once Redis is full nothing more is cached (stores fail with "
            "OOM; reads stay correct). Use allkeys-lru (CONFIG SET maxmemory-policy allkeys-lru) "
            "for a Redis that only caches, or volatile-lru for one that holds other data too",
        )
    else:
        report.add("WARN", f"maxmemory-policy {policy}: unknown to sqlacache; allkeys-lru is recommended")


def _persistence(report: Report, save: str | None, appendonly: str | None) -> None:
    if save is None or appendonly is None:
        report.add("WARN", "cannot read save / appendonly (CONFIG GET refused): check persistence by hand")
        return
    kept = [
        what
        for what, on in (("RDB snapshots (save)", save.strip() != ""), ("AOF", appendonly == "yes"))
        if on
    ]
    if kept:
        report.add(
            "WARN",
            f"persistence on ({', '.join(kept)}): a restart from an older snapshot brings back entries "
            "later commits invalidated (processes that saw newer data evict everything; idle ones "
            'can\'t tell). Run a cache without persistence: --save "" --appendonly no',
        )
    else:
        report.add("OK", "no persistence: a restart starts empty, which is always fresh")


def doctor(target: Target) -> Report:
    report = Report()
    elapsed, info = ping(target)
    report.add(
        "OK",
        f"reachable: Redis {info.get('redis_version', '?')} at {shown(target.url)} "
        f"({info.get('redis_mode', 'standalone')}), PING {elapsed:.2f} ms",
    )
    version = tuple(int(p) for p in str(info.get("redis_version", "0")).split(".")[:2] if p.isdigit())
    if version and version < (6, 2):
        report.add(
            "WARN", f"Redis {info.get('redis_version')} is older than 6.2, the oldest sqlacache is tested on"
        )
    if elapsed > 25:
        report.add(
            "WARN",
            f"PING took {elapsed:.1f} ms, half the default socket_timeout (50 ms): slower "
            "calls time out and reads fall back to the database",
        )
    _policy(report, _config(target, "maxmemory-policy"), _config(target, "maxmemory"))
    _persistence(report, _config(target, "save"), _config(target, "appendonly"))
    generation = target.client.get(f"{target.prefix}:gen")
    if generation is None:
        report.add("OK", f"prefix {target.prefix!r}: no data yet (nothing cached under it)")
    else:
        report.add(
            "OK", f"prefix {target.prefix!r}: in use (generation {generation.decode(errors='replace')})"
        )
    return report


def run_doctor(target: Target) -> int:
    report = doctor(target)
    for level, text in report.lines:
        print(f"{level:<4}  {text}")
    if report.problems:
        print(f"{report.problems} problem(s) found")
        return PROBLEMS
    print("no problems found")
    return OK
