"""The fault-injection harness itself: every fault it promises really happens."""

from __future__ import annotations

import socket
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)
from redis.retry import Retry

from tests.faults import RedisServer, TcpProxy


def _raw_connection(port: int, timeout: float = 1.0) -> redis.Connection:
    """A bare connection: no pool health check and no retry between a fault and the test."""
    conn = redis.Connection(
        host="127.0.0.1", port=port, socket_timeout=timeout, socket_connect_timeout=timeout
    )
    conn.connect()
    return conn


def _ping(conn: redis.Connection) -> object:
    conn.send_command("PING")
    return conn.read_response()


# ---------------------------------------------------------------------------------------------
# RedisServer


def test_fresh_redis_is_empty_and_on_its_own_port(fresh_redis: RedisServer) -> None:
    assert fresh_redis.port != 6379
    assert fresh_redis.url == f"redis://127.0.0.1:{fresh_redis.port}/0"
    assert fresh_redis.running
    with fresh_redis.client() as r:
        assert r.dbsize() == 0
        assert r.config_get("save")["save"] == ""
        assert r.config_get("appendonly")["appendonly"] == "no"
        r.set("k", "v")


def test_fresh_redis_starts_empty_again(fresh_redis: RedisServer) -> None:
    with fresh_redis.client() as r:
        assert r.dbsize() == 0


def test_pause_makes_ping_time_out_and_resume_brings_it_back(fresh_redis: RedisServer) -> None:
    with fresh_redis.client(socket_timeout=0.2) as r:
        assert r.ping()
        fresh_redis.pause()
        try:
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                r.ping()
            assert time.monotonic() - started < 1
        finally:
            fresh_redis.resume()
        assert r.ping()
    with fresh_redis.paused(), fresh_redis.client(socket_timeout=0.2) as r, pytest.raises(RedisTimeoutError):
        r.ping()
    with fresh_redis.client() as r:
        assert r.ping()


def test_stop_start_and_restart_lose_the_data(fresh_redis: RedisServer) -> None:
    with fresh_redis.client() as r:
        r.set("k", "v")
    fresh_redis.stop()
    fresh_redis.kill()  # idempotent
    assert not fresh_redis.running
    with fresh_redis.client(socket_timeout=0.2) as r, pytest.raises(RedisConnectionError):
        r.ping()
    fresh_redis.start()
    fresh_redis.start()  # idempotent
    with fresh_redis.client() as r:
        assert r.get("k") is None
        r.set("k", "v")
    fresh_redis.restart()
    with fresh_redis.client() as r:
        assert r.get("k") is None


def test_restart_keeping_data(fresh_redis: RedisServer) -> None:
    with fresh_redis.client() as r:
        r.set("k", "v")
        sha = r.script_load("return 1")
    fresh_redis.restart(keep_data=True)
    with fresh_redis.client() as r:
        assert r.get("k") == b"v"
        assert r.script_exists(sha) == [False]  # scripts do not survive a restart
    fresh_redis.stop()
    fresh_redis.start()  # the snapshot does not come back after it was loaded once
    with fresh_redis.client() as r:
        assert r.get("k") is None


def test_restore_snapshot_later_brings_back_older_data(fresh_redis: RedisServer) -> None:
    with fresh_redis.client() as r:
        r.set("a", "old")
    restore = fresh_redis.restore_snapshot_later()
    with fresh_redis.client() as r:
        r.set("a", "new")
        r.set("b", "new")
    restore()
    with fresh_redis.client() as r:
        assert r.get("a") == b"old"
        assert r.get("b") is None


def test_fill_until_oom_then_clear(fresh_redis: RedisServer) -> None:
    fresh_redis.fill_until_oom()
    with fresh_redis.client() as r:
        with pytest.raises(OutOfMemoryError):
            r.set("k", "v")
        assert r.get("missing") is None  # reads still work
        r.delete("missing")  # so do deletes
    fresh_redis.clear_oom()
    with fresh_redis.client() as r:
        assert r.set("k", "v")
        assert not list(r.scan_iter(match="filler:*"))
        assert r.config_get("maxmemory")["maxmemory"] == "0"


def test_replica_refuses_writes(fresh_redis: RedisServer) -> None:
    with fresh_redis.client() as r:
        r.set("k", "v")
    replica = fresh_redis.replica()
    try:
        assert replica.port != fresh_redis.port
        with replica.client() as r:
            assert r.get("k") == b"v"
            with pytest.raises(ReadOnlyError):
                r.set("k", "w")
    finally:
        replica.stop()
        replica.close()
    assert not replica.running


def test_loading_answers_busy_loading(fresh_redis: RedisServer) -> None:
    with fresh_redis.client() as r:
        r.set("k", "v")
    started = time.monotonic()
    with fresh_redis.loading(seconds=1.0):
        entered = time.monotonic()
        with fresh_redis.client() as r:
            with pytest.raises(BusyLoadingError):
                r.get("k")
            time.sleep(0.3)
            with pytest.raises(BusyLoadingError):
                r.get("k")
    assert time.monotonic() - entered > 0.5
    assert time.monotonic() - started < 8
    with fresh_redis.client() as r:
        assert r.ping()
        assert r.dbsize() == 0  # FLUSHALL after loading
        assert r.config_get("key-load-delay")["key-load-delay"] == "0"
        assert r.set("k", "v")


def test_script_flush_forgets_loaded_scripts(fresh_redis: RedisServer) -> None:
    with fresh_redis.client() as r:
        sha = r.script_load("return 42")
        assert r.evalsha(sha, 0) == 42
        fresh_redis.script_flush()
        with pytest.raises(NoScriptError):
            r.evalsha(sha, 0)


def test_flushall(fresh_redis: RedisServer) -> None:
    with fresh_redis.client() as r:
        r.set("k", "v")
        fresh_redis.flushall()
        assert r.dbsize() == 0


# ---------------------------------------------------------------------------------------------
# TcpProxy


def test_proxy_forwards(proxy: TcpProxy, fresh_redis: RedisServer) -> None:
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"
    with redis.Redis.from_url(proxy.url) as r:
        r.set("k", "v")
        big = b"x" * 3_000_000
        r.set("big", big)
        assert r.get("big") == big
    with fresh_redis.client() as r:
        assert r.get("k") == b"v"


def test_proxy_latency(proxy: TcpProxy) -> None:
    latency = 0.15
    with redis.Redis.from_url(proxy.url, socket_timeout=2) as r:
        r.ping()
        started = time.monotonic()
        r.ping()
        baseline = time.monotonic() - started
        proxy.set_latency(latency)
        started = time.monotonic()
        assert r.ping()
        elapsed = time.monotonic() - started
        assert elapsed >= 2 * latency  # one way each
        assert elapsed < 2 * latency + baseline + 0.5
        proxy.set_latency(0)
        started = time.monotonic()
        r.ping()
        assert time.monotonic() - started < latency


def test_proxy_blackhole(proxy: TcpProxy) -> None:
    existing = _raw_connection(proxy.port, timeout=0.2)
    assert _ping(existing) == b"PONG"
    proxy.blackhole()
    with pytest.raises(RedisTimeoutError):
        _ping(existing)  # an existing connection hangs
    no_retry = Retry(NoBackoff(), 0)
    with (
        redis.Redis.from_url(proxy.url, socket_timeout=0.2, retry=no_retry) as r,
        pytest.raises(RedisTimeoutError),
    ):
        r.ping()  # a new one is accepted, then hangs
    existing.disconnect()
    proxy.heal()
    with redis.Redis.from_url(proxy.url, socket_timeout=1) as r:
        assert r.ping()


def test_proxy_drop(proxy: TcpProxy) -> None:
    conn = _raw_connection(proxy.port)
    assert _ping(conn) == b"PONG"
    proxy.drop()
    with pytest.raises(RedisConnectionError):
        _ping(conn)
    conn.disconnect()
    conn = _raw_connection(proxy.port)
    assert _ping(conn) == b"PONG"  # new connections work
    conn.disconnect()


def test_proxy_refuse(proxy: TcpProxy) -> None:
    existing = _raw_connection(proxy.port)
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
    with pytest.raises(RedisConnectionError):
        _raw_connection(proxy.port)
    assert _ping(existing) == b"PONG"  # refuse() leaves open connections alone
    existing.disconnect()
    proxy.refuse(False)
    conn = _raw_connection(proxy.port)
    assert _ping(conn) == b"PONG"
    conn.disconnect()
    proxy.refuse()
    proxy.heal()
    with redis.Redis.from_url(proxy.url) as r:
        assert r.ping()


def test_proxy_to_a_dead_server_closes_connections(proxy: TcpProxy, fresh_redis: RedisServer) -> None:
    fresh_redis.stop()
    with pytest.raises(RedisConnectionError):
        _ping(_raw_connection(proxy.port))
    fresh_redis.start()
    conn = _raw_connection(proxy.port)
    assert _ping(conn) == b"PONG"
    conn.disconnect()


def test_proxy_stop_closes_everything(fresh_redis: RedisServer) -> None:
    p = TcpProxy(fresh_redis.port)
    p.start()
    conn = _raw_connection(p.port)
    assert _ping(conn) == b"PONG"
    p.stop()
    p.stop()  # idempotent
    with pytest.raises(RedisConnectionError):
        _ping(conn)
    conn.disconnect()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", p.port), timeout=1).close()
