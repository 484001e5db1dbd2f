"""``python -m sqlacache``, run as a subprocess against the real Redis (and, for doctor's advice, a
throwaway redis-server whose configuration the test sets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlacache import Cache, CachingSession
from tests.conftest import require_redis_server
from tests.faults import RedisServer

ROOT = Path(__file__).resolve().parent.parent


class Base(DeclarativeBase):
    pass


class Gadget(Base):
    __tablename__ = "cli_gadgets"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SQLACACHE_URL"}
    environ.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "sqlacache", *args], capture_output=True, text=True, env=environ, timeout=60
    )


@pytest.fixture
def app(tmp_path: Path, redis_url: str, key_prefix: str) -> Iterator[Any]:
    """An application's cache on the real Redis, with one read of ``cli_gadgets`` cached."""
    engine = create_engine(f"sqlite:///{tmp_path / 'cli.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Gadget(id=1, name="gear"))
        s.commit()
    sql: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda c, cur, stmt, *a: sql.append(stmt))
    cache = Cache(backend=redis_url, prefix=key_prefix)

    def read() -> int:
        """Read the gadgets; return how many statements it sent."""
        before = len(sql)
        with CachingSession(engine, cache=cache) as s:
            assert [g.name for g in s.scalars(select(Gadget))] == ["gear"]
        return len(sql) - before

    assert read() == 1 and read() == 0
    yield read, cache, engine
    cache.invalidate_all()
    cache.close()
    engine.dispose()


def entry_keys(redis_url: str, prefix: str) -> list[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return sorted(k.decode() for k in client.scan_iter(match=f"{prefix}:e:*", count=1000))
    finally:
        client.close()


def test_ping(redis_url: str) -> None:
    done = cli("ping", "--url", redis_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("PONG from Redis ") and " ms" in done.stdout


def test_url_from_the_environment(redis_url: str) -> None:
    done = cli("ping", env={"SQLACACHE_URL": redis_url})
    assert done.returncode == 0 and redis_url in done.stdout


def test_unreachable_redis_is_exit_3() -> None:
    done = cli("ping", "--url", "redis://127.0.0.1:1/0", "--timeout", "0.5")
    assert done.returncode == 3
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in done.stderr and done.stdout == ""


def test_the_password_is_not_printed() -> None:
    done = cli("ping", "--url", "redis://user:s3cret@127.0.0.1:1/0", "--timeout", "0.5")
    assert done.returncode == 3 and "s3cret" not in done.stderr and "user:***@127.0.0.1:1" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ping", "--url", "http://x"], "give a Redis URL"),
        (["stats", "--url", "redis://127.0.0.1:6379/0", "--prefix", "a b"], "--prefix 'a b'"),
        (
            ["invalidate", "--url", "redis://127.0.0.1:6379/0"],
            "one of the arguments --table --all is required",
        ),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        (["ping", "--timeout", "0"], "--timeout 0.0: give a positive number"),
    ],
)
def test_wrong_command_lines_are_exit_2(args: list[str], message: str) -> None:
    done = cli(*args)
    assert done.returncode == 2
    assert message in done.stderr


def test_stats_counts_what_the_prefix_holds(app: Any, redis_url: str, key_prefix: str) -> None:
    done = cli("stats", "--url", redis_url, "--prefix", key_prefix, "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["prefix"] == key_prefix and found["entries"] == 1
    assert found["versions"] >= 2  # "*" and t:cli_gadgets at least
    assert isinstance(found["generation"], int) and found["server"]["used_memory"] > 0
    text = cli("stats", "--url", redis_url, "--prefix", key_prefix)
    assert text.returncode == 0 and "entries           1" in text.stdout
    empty = json.loads(cli("stats", "--url", redis_url, "--prefix", key_prefix + "-none", "--json").stdout)
    assert (empty["entries"], empty["generation"]) == (0, None)


def test_inspect_an_entry_then_see_it_outdated(app: Any, redis_url: str, key_prefix: str) -> None:
    _, cache, engine = app
    [key] = entry_keys(redis_url, key_prefix)
    done = cli("inspect", key, "--url", redis_url, "--prefix", key_prefix, "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["valid"] is True and found["ttl_seconds"] > 0
    assert {"*", "t:cli_gadgets"} <= {d["dependency"] for d in found["dependencies"]}
    assert "gear" in found["payload"]
    # The same key without its prefix, as the cache names it; then a commit outdates it.
    short = key.split(":e:", 1)[1]
    with CachingSession(engine, cache=cache) as s:
        s.add(Gadget(id=2, name="cog"))
        s.commit()
    done = cli("inspect", short, "--url", redis_url, "--prefix", key_prefix)
    assert done.returncode == 0, done.stderr
    assert "OUTDATED (a miss)" in done.stdout and "NEW  t:cli_gadgets" in done.stdout


def test_inspect_a_missing_key_is_exit_1(redis_url: str, key_prefix: str) -> None:
    done = cli("inspect", "nope", "--url", redis_url, "--prefix", key_prefix)
    assert done.returncode == 1 and f"no key '{key_prefix}:e:nope'" in done.stderr


def test_inspect_a_foreign_value(redis_url: str, key_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(f"{key_prefix}:e:junk", b"hello", px=60_000)
        found = json.loads(
            cli("inspect", "junk", "--url", redis_url, "--prefix", key_prefix, "--json").stdout
        )
        assert found["valid"] is False and "not in sqlacache's entry format" in found["problem"]
    finally:
        client.delete(f"{key_prefix}:e:junk")


def test_invalidate_a_table(app: Any, redis_url: str, key_prefix: str) -> None:
    read = app[0]
    other = cli("invalidate", "--table", "other_table", "--url", redis_url, "--prefix", key_prefix)
    assert other.returncode == 0, other.stderr
    assert read() == 0  # another table: still cached
    done = cli("invalidate", "--table", "CLI_GADGETS", "--url", redis_url, "--prefix", key_prefix)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "evicted the reads of CLI_GADGETS" in done.stdout
    assert read() == 1 and read() == 0  # evicted: read from the database, then cached again


def test_invalidate_all(app: Any, redis_url: str, key_prefix: str) -> None:
    read = app[0]
    done = cli("invalidate", "--all", "--url", redis_url, "--prefix", key_prefix)
    assert done.returncode == 0, done.stderr
    assert entry_keys(redis_url, key_prefix) == []
    assert read() == 1


def test_invalidate_unreachable_is_exit_3() -> None:
    done = cli("invalidate", "--all", "--url", "redis://127.0.0.1:1/0", "--timeout", "0.3")
    assert done.returncode == 3
    assert done.stderr == (
        "python -m sqlacache invalidate: the invalidation could not be delivered to Redis at "
        "redis://127.0.0.1:1/0\n"
    )


def test_invalidate_a_wrong_url_is_exit_2() -> None:
    done = cli("invalidate", "--all", "--url", "http://x")
    assert done.returncode == 2 and "unknown scheme 'http'" in done.stderr


def test_invalidate_on_a_redis_cluster(tmp_path: Path, redis_cluster: Any, key_prefix: str) -> None:
    """``invalidate`` takes any URL a Cache takes: a table's reads on a Redis Cluster are evicted."""
    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    Base.metadata.create_all(engine)
    cache = Cache(backend=redis_cluster.url, prefix=key_prefix)
    calls: list[int] = []

    @cache.memoize(depends_on=[Gadget], bind=engine)
    def count() -> int:
        calls.append(1)
        return len(calls)

    try:
        assert count() == 1 and count() == 1
        done = cli("invalidate", "--table", "cli_gadgets", "--url", redis_cluster.url, "--prefix", key_prefix)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        assert count() == 2
    finally:
        cache.invalidate_all()
        cache.close()


# -- doctor, on a redis-server of its own (CONFIG SET on the shared one would change it for everyone)


@pytest.fixture
def own_redis(request: pytest.FixtureRequest) -> Iterator[str]:
    require_redis_server("doctor's tests")
    extra: list[str] = getattr(request, "param", [])
    server = RedisServer("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru", *extra)
    server.start()
    try:
        yield server.url
    finally:
        server.close()


def test_doctor_on_a_server_set_up_for_a_cache(own_redis: str) -> None:
    done = cli("doctor", "--url", own_redis)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "maxmemory-policy allkeys-lru" in done.stdout and "no persistence" in done.stdout
    assert done.stdout.rstrip().endswith("no problems found")


def test_doctor_advice(own_redis: str) -> None:
    client = redis.Redis.from_url(own_redis)
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("save", "900 1")
        client.config_set("appendonly", "yes")
        done = cli("doctor", "--url", own_redis)
        assert done.returncode == 1
        assert "WARN  maxmemory-policy noeviction: once Redis is full nothing more is cached" in done.stdout
        assert (
            "persistence on (RDB snapshots (save), AOF)" in done.stdout
            and "2 problem(s) found" in done.stdout
        )
        client.config_set("maxmemory-policy", "volatile-lru")
        client.config_set("save", "")
        client.config_set("appendonly", "no")
        done = cli("doctor", "--url", own_redis)
        assert done.returncode == 0 and "volatile-lru: safe" in done.stdout
        client.config_set("maxmemory", "0")
        done = cli("doctor", "--url", own_redis)
        assert done.returncode == 1 and "maxmemory is 0 (no limit" in done.stdout
    finally:
        client.close()


@pytest.mark.parametrize("own_redis", [["--rename-command", "CONFIG", ""]], indirect=True)
def test_doctor_without_config_get(own_redis: str) -> None:
    """A managed Redis that refuses CONFIG: the checks it needs are reported as "by hand"."""
    done = cli("doctor", "--url", own_redis)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot read maxmemory / maxmemory-policy (CONFIG GET refused): check them by hand" in done.stdout
    assert "cannot read save / appendonly" in done.stdout
