"""Issue 15: a shared Redis is not a trusted place.

Against the real Redis: excluded columns never reach any Redis value; a signed cache never serves
an entry that was altered, truncated, unsigned or copied under another key (sync and async);
secrets rotate; encrypted entries round-trip every codec type and are unreadable without the key.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio
from sqlalchemy import JSON, LargeBinary, String, create_engine, event, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column

from sqlacache import Cache, CachingAsyncSession, CachingSession, ConfigurationError

SECRET = "0123456789abcdef-not-a-real-secret"
HASH = "$argon2id$v=19$m=65536,t=3,p=4$SECRETHASH"
APIKEY = "ak_live_APIKEYVALUE"


class Base(DeclarativeBase):
    pass


class Color(enum.Enum):
    red = "red"
    blue = "blue"


class Account(Base):
    __tablename__ = "sec_accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(80))
    hashed_password: Mapped[str] = mapped_column(String(200))
    api_key: Mapped[str] = mapped_column(String(80), info={"sqlacache": "never"})
    reset_token: Mapped[str | None] = mapped_column(String(80), nullable=True)


class Member(Base):
    """The asyncio recipe of docs/security.rst: an excluded column mapped deferred()."""

    __tablename__ = "sec_members"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    hashed_password: Mapped[str] = deferred(mapped_column(String(200), info={"sqlacache": "never"}))


class Typed(Base):
    """One column per codec type: an encrypted entry must give each back exactly."""

    __tablename__ = "sec_typed"
    id: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int]
    big: Mapped[int]
    f: Mapped[float]
    d: Mapped[decimal.Decimal]
    s: Mapped[str] = mapped_column(String(100))
    b: Mapped[bool]
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    day: Mapped[datetime.date]
    at: Mapped[datetime.datetime]
    clock: Mapped[datetime.time]
    span: Mapped[datetime.timedelta]
    u: Mapped[uuid.UUID]
    color: Mapped[Color]
    doc: Mapped[Any] = mapped_column(JSON)
    maybe: Mapped[str | None] = mapped_column(String(10), nullable=True)


TYPED = dict(
    id=1,
    n=-7,
    big=2**62,
    f=0.1,
    d=decimal.Decimal("12.34"),
    s="héllo \x00 wörld"[:5] + "✓",
    b=True,
    raw=b"\x00\xffbytes",
    day=datetime.date(2024, 2, 29),
    at=datetime.datetime(2024, 1, 2, 3, 4, 5, 678901),
    clock=datetime.time(23, 59, 58, 1),
    span=datetime.timedelta(days=3, microseconds=5),
    u=uuid.UUID("12345678-1234-5678-1234-567812345678"),
    color=Color.blue,
    doc={"a": [1, 2.5, None, "x"], "b": {"c": True}},
    maybe=None,
)


def _engine(tmp_path: Any) -> Any:
    engine = create_engine(f"sqlite:///{tmp_path / 'sec.db'}")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            Account.__table__.insert(),
            [
                dict(id=i, email=f"u{i}@example.com", hashed_password=f"{HASH}{i}", api_key=f"{APIKEY}{i}")
                for i in (1, 2)
            ],
        )
        conn.execute(Typed.__table__.insert(), [TYPED])
        conn.execute(Member.__table__.insert(), [dict(id=1, name="ann", hashed_password=HASH)])
    engine.sql = []  # type: ignore[attr-defined]
    event.listen(engine, "before_cursor_execute", lambda *a: engine.sql.append(a[2]))  # type: ignore[attr-defined]
    return engine


def _redis_values(url: str, prefix: str) -> dict[bytes, bytes]:
    """Every value of every key under the prefix, whatever its type, as bytes."""
    client = redis.Redis.from_url(url)
    out: dict[bytes, bytes] = {}
    for key in client.scan_iter(f"{prefix}:*", count=1000):
        kind = client.type(key)
        if kind == b"string":
            out[key] = client.get(key) or b""
        elif kind == b"hash":
            out[key] = b"|".join(k + b"=" + v for k, v in client.hgetall(key).items())
        elif kind == b"set":
            out[key] = b"|".join(client.smembers(key))
        elif kind == b"zset":
            out[key] = b"|".join(m for m, _ in client.zrange(key, 0, -1, withscores=True))
        elif kind == b"list":
            out[key] = b"|".join(client.lrange(key, 0, -1))
        elif kind == b"stream":
            out[key] = repr(client.xrange(key)).encode()
    client.close()
    return out


def _entry_keys(url: str, prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return sorted(client.scan_iter(f"{prefix}:e:*", count=1000))
    finally:
        client.close()


# -- columns that never leave the process --------------------------------------------------------


def test_excluded_columns_never_reach_redis(tmp_path: Any, redis_url: str, key_prefix: str) -> None:
    engine = _engine(tmp_path)
    cache = Cache(
        redis_url,
        prefix=key_prefix,
        models={Account: {"exclude": ["hashed_password"]}, "*": {}},
        exclude_columns=["*_token"],
    )
    try:
        for round_ in range(2):  # a miss that stores, then hits
            with CachingSession(engine, cache=cache) as s:
                a = s.get(Account, 1)
                assert a.email == "u1@example.com"
                rows = s.scalars(select(Account).where(Account.email == "u2@example.com")).all()
                assert [r.id for r in rows] == [2]
                listed = s.scalars(select(Account).order_by(Account.id)).all()
                assert [r.id for r in listed] == [1, 2]
                # Loaded from the database on access (an extra statement on a hit), exactly right.
                before = len(engine.sql)
                assert a.hashed_password == f"{HASH}1"
                assert a.api_key == f"{APIKEY}1"
                assert listed[1].reset_token is None
                if round_ == 1:
                    assert len(engine.sql) > before
                # A statement that names an excluded column itself is never cached.
                assert s.scalars(select(Account.hashed_password).order_by(Account.id)).all() == [
                    f"{HASH}1",
                    f"{HASH}2",
                ]
                found = s.scalars(select(Account.id).where(Account.api_key == f"{APIKEY}2")).all()
                assert found == [2]
                core = s.execute(select(Account.__table__).order_by(Account.id)).all()  # the Table
                assert [r.hashed_password for r in core] == [f"{HASH}1", f"{HASH}2"]
            cache.wait_for_stores()
        assert cache.stats()["hits"] >= 3
        values = _redis_values(redis_url, key_prefix)
        assert any(b"u1@example.com" in v for v in values.values())  # the scan does see payloads
        for key, value in values.items():
            for secret in (b"SECRETHASH", b"APIKEYVALUE", b"argon2"):
                assert secret not in value, (key, value[:200])
                assert secret not in key
        # A write: its invalidation carries no excluded value either (and evicts what it must).
        with CachingSession(engine, cache=cache) as s:
            a = s.get(Account, 1)
            a.hashed_password = "$argon2id$NEWSECRETHASH"
            a.api_key = "ak_live_NEWAPIKEYVALUE"
            s.commit()
        with CachingSession(engine, cache=cache) as s:
            assert s.get(Account, 1).hashed_password == "$argon2id$NEWSECRETHASH"
        cache.wait_for_stores()
        for value in _redis_values(redis_url, key_prefix).values():
            assert b"NEWSECRETHASH" not in value and b"NEWAPIKEYVALUE" not in value
    finally:
        cache.invalidate_all()
        cache.close()
        engine.dispose()


def test_without_exclusion_the_column_is_in_redis(tmp_path: Any, redis_url: str, key_prefix: str) -> None:
    """The control: the scan above would see the hash if it were stored."""
    engine = _engine(tmp_path)
    cache = Cache(redis_url, prefix=key_prefix, exclude_columns=["api_key"])
    try:
        with CachingSession(engine, cache=cache) as s:
            s.get(Account, 1)
        cache.wait_for_stores()
        values = _redis_values(redis_url, key_prefix).values()
        assert any(b"SECRETHASH" in v for v in values)
    finally:
        cache.invalidate_all()
        cache.close()
        engine.dispose()


def test_exclusion_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="not column attributes of Account"):
        Cache(models={Account: {"exclude": ["password"]}})
    with pytest.raises(ConfigurationError, match="list of column attributes"):
        Cache(models={Account: {"exclude": "hashed_password"}})
    with pytest.raises(ConfigurationError, match="exclude_columns"):
        Cache(models={"*": {"exclude": ["x"]}})
    with pytest.raises(ConfigurationError, match="exclude_columns='hashed_password'"):
        Cache(exclude_columns="hashed_password")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not a column name"):
        Cache(exclude_columns=[""])


# -- signed entries ------------------------------------------------------------------------------


def _tamper(url: str, prefix: str, how: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = sorted(client.scan_iter(f"{prefix}:e:*"))
        assert keys, "nothing cached"
        for key in keys:
            value = client.get(key)
            assert value is not None
            ttl = client.pttl(key)
            if how == "flip":
                value = value[:-1] + bytes([value[-1] ^ 1])
            elif how == "truncate":
                value = value[:-7]
            client.set(key, value, px=ttl if ttl > 0 else None)
    finally:
        client.close()


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_altered_entry_is_never_served(tmp_path: Any, redis_url: str, key_prefix: str, how: str) -> None:
    engine = _engine(tmp_path)
    cache = Cache(redis_url, prefix=key_prefix, secret=SECRET)
    try:
        with CachingSession(engine, cache=cache) as s:
            assert s.get(Account, 1).email == "u1@example.com"
        cache.wait_for_stores()
        _tamper(redis_url, key_prefix, how)
        before = len(engine.sql)
        with CachingSession(engine, cache=cache) as s:
            assert s.get(Account, 1).email == "u1@example.com"
        assert len(engine.sql) == before + 1  # read from the database
        stats = cache.stats()
        assert stats.get("tampered", 0) + stats.get("corrupt", 0) == 1
        assert stats.get("hits", 0) == 0
    finally:
        cache.invalidate_all()
        cache.close()
        engine.dispose()


def _copy_entry(url: str, prefix: str, source: bytes, target: bytes) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.set(target, client.get(source) or b"", px=60_000)
    finally:
        client.close()


@pytest.mark.parametrize("secret", [None, SECRET])
def test_entry_copied_under_another_key(tmp_path: Any, redis_url: str, key_prefix: str, secret: Any) -> None:
    """Without a secret, whoever can write Redis makes get(Account, 2) return account 1; with one,
    the copy fails its check and the database answers."""
    engine = _engine(tmp_path)
    cache = Cache(redis_url, prefix=key_prefix, secret=secret)
    try:
        with CachingSession(engine, cache=cache) as s:
            s.get(Account, 1)
        cache.wait_for_stores()
        [one] = _entry_keys(redis_url, key_prefix)
        with CachingSession(engine, cache=cache) as s:
            s.get(Account, 2)
        cache.wait_for_stores()
        [two] = [k for k in _entry_keys(redis_url, key_prefix) if k != one]
        _copy_entry(redis_url, key_prefix, one, two)
        with CachingSession(engine, cache=cache) as s:
            served = s.get(Account, 2)
            served_email = served.email if served is not None else None
        if secret is None:
            assert served_email != "u2@example.com"  # the attack works without a secret
        else:
            assert served_email == "u2@example.com"
            assert cache.stats()["tampered"] == 1
            cache.wait_for_stores()
            client = redis.Redis.from_url(redis_url)
            assert client.get(two) != client.get(one)  # deleted (and stored again from the database)
            client.close()
    finally:
        cache.invalidate_all()
        cache.close()
        engine.dispose()


@pytest.mark.parametrize("backend", ["redis", "cluster"])
def test_unsigned_entry_is_not_served_to_a_signed_cache(
    tmp_path: Any, request: pytest.FixtureRequest, key_prefix: str, backend: str
) -> None:
    """A process without the secret (or anything else that writes Redis) stores an entry: a signed
    cache never serves it. The check sits above the backends: a Redis Cluster gets it too."""
    url = request.getfixturevalue("redis_url" if backend == "redis" else "redis_cluster")
    url = url if isinstance(url, str) else url.url
    engine = _engine(tmp_path)
    plain = Cache(url, prefix=key_prefix)
    signed = Cache(url, prefix=key_prefix, secret=SECRET)
    try:
        with CachingSession(engine, cache=plain) as s:
            s.get(Account, 1)
        plain.wait_for_stores()
        with CachingSession(engine, cache=plain) as s:
            s.get(Account, 1)
        assert plain.stats()["hits"] == 1  # it is there
        before = len(engine.sql)
        with CachingSession(engine, cache=signed) as s:
            assert s.get(Account, 1).email == "u1@example.com"
        assert len(engine.sql) == before + 1
        assert signed.stats()["tampered"] == 1
        signed.wait_for_stores()
        with CachingSession(engine, cache=signed) as s:  # its own, signed entry: served
            s.get(Account, 1)
        assert signed.stats()["hits"] == 1
    finally:
        signed.invalidate_all()
        plain.close()
        signed.close()
        engine.dispose()


def test_rotation_signs_with_the_first_and_accepts_any(
    tmp_path: Any, redis_url: str, key_prefix: str
) -> None:
    engine = _engine(tmp_path)
    old = Cache(redis_url, prefix=key_prefix, secret="old-secret-0123456789")
    rotated = Cache(redis_url, prefix=key_prefix, secret=["new-secret-0123456789", "old-secret-0123456789"])
    new_only = Cache(redis_url, prefix=key_prefix, secret="new-secret-0123456789")
    try:
        with CachingSession(engine, cache=old) as s:
            s.get(Account, 1)
        old.wait_for_stores()
        with CachingSession(engine, cache=rotated) as s:  # an entry of the old secret: accepted
            s.get(Account, 1)
        assert rotated.stats()["hits"] == 1
        with CachingSession(engine, cache=new_only) as s:  # the old secret is not the new one's
            s.get(Account, 1)
        assert new_only.stats().get("hits", 0) == 0 and new_only.stats()["tampered"] == 1
        new_only.wait_for_stores()
        with CachingSession(engine, cache=rotated) as s:  # stored under the new secret: accepted
            s.get(Account, 1)
        assert rotated.stats()["hits"] == 2
        with CachingSession(engine, cache=old) as s:  # a process not yet rotated can't read it
            s.get(Account, 1)
        assert old.stats()["tampered"] == 1
    finally:
        rotated.invalidate_all()
        for c in (old, rotated, new_only):
            c.close()
        engine.dispose()


def test_memory_backend_signs_too(tmp_path: Any) -> None:
    """The seal sits above the backends: an in-process backend holds sealed entries as well."""
    engine = _engine(tmp_path)
    cache = Cache("memory://", secret=SECRET)
    try:
        for _ in range(2):
            with CachingSession(engine, cache=cache) as s:
                assert s.get(Account, 1).email == "u1@example.com"
        assert cache.stats()["hits"] == 1
        store = cache.backend._entries  # type: ignore[attr-defined]
        [value] = list(store.values())
        assert value.payload[:2] == b"\xa7s"
    finally:
        cache.close()
        engine.dispose()


def test_secret_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="at least 16 random bytes"):
        Cache(secret="short")
    with pytest.raises(ConfigurationError, match="non-empty list"):
        Cache(secret=[])
    with pytest.raises(ConfigurationError, match="at least 16"):
        Cache(secret=[SECRET, 42])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="encryption_key"):
        Cache(encryption_key="short")


async def test_async_tampered_and_copied_entries_are_never_served(
    tmp_path: Any, redis_url: str, key_prefix: str
) -> None:
    _engine(tmp_path).dispose()
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'sec.db'}")
    client = redis.asyncio.Redis.from_url(redis_url)
    cache = Cache(client, prefix=key_prefix, secret=SECRET)
    try:
        for i in (1, 2):
            async with CachingAsyncSession(engine, cache=cache) as s:
                assert (await s.get(Account, i)).email == f"u{i}@example.com"
        await cache.await_for_stores()
        one, two = _entry_keys(redis_url, key_prefix)
        _copy_entry(redis_url, key_prefix, one, two)
        for i in (1, 2):
            async with CachingAsyncSession(engine, cache=cache) as s:
                assert (await s.get(Account, i)).email == f"u{i}@example.com"
        assert cache.stats()["tampered"] == 1
        await cache.await_for_stores()
        _tamper(redis_url, key_prefix, "flip")
        for i in (1, 2):
            async with CachingAsyncSession(engine, cache=cache) as s:
                assert (await s.get(Account, i)).email == f"u{i}@example.com"
        stats = cache.stats()
        # 3, or 2 when the copy's deletion (a task) ran after account 2 was stored again: a miss.
        assert stats["tampered"] in (2, 3)
        assert stats["hits"] == 1  # only the entry that was not touched (account 1, round 2)
        assert stats["errors"] == 0  # the deletes too went through the asyncio client
    finally:
        await cache.ainvalidate_all()
        await cache.aclose()
        await client.aclose()
        await engine.dispose()


# -- encryption at rest --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["encryption-key-0123456789", ["encryption-key-new-000", "encryption-key-0123456789"]]
)
def test_encryption_round_trips_every_codec_type(
    tmp_path: Any, redis_url: str, key_prefix: str, key: Any
) -> None:
    pytest.importorskip("cryptography")
    engine = _engine(tmp_path)
    cache = Cache(redis_url, prefix=key_prefix, encryption_key=key)
    try:
        for _ in range(3):  # (a first condition read registers its scheme: its store is refused)
            with CachingSession(engine, cache=cache) as s:
                t = s.get(Typed, 1)
                assert {k: getattr(t, k) for k in TYPED} == TYPED
                assert {k: type(getattr(t, k)) for k in TYPED} == {k: type(v) for k, v in TYPED.items()}
                a = s.scalars(select(Account).where(Account.id == 1)).one()
                assert a.email == "u1@example.com"
            cache.wait_for_stores()
        assert cache.stats()["hits"] >= 3, cache.stats()
        values = _redis_values(redis_url, key_prefix)
        entries = [v for k, v in values.items() if b":e:" in k]
        assert len(entries) == 2
        for value in entries:
            payload = value.partition(b"\n")[2]
            assert payload[:2] == b"\xa7e"
            assert b"example.com" not in value and b"12.34" not in value and b"blue" not in value
        # Without the key (or with another), an encrypted entry is a miss, never served.
        other = Cache(redis_url, prefix=key_prefix, encryption_key="another-key-0123456789")
        with CachingSession(engine, cache=other) as s:
            assert s.get(Typed, 1).d == decimal.Decimal("12.34")
        assert other.stats()["tampered"] == 1
        other.close()
    finally:
        cache.invalidate_all()
        cache.close()
        engine.dispose()


# -- tenants ---------------------------------------------------------------------------------------


def test_tenants_never_share_an_entry_and_invalidate_all_stays_in_its_prefix(
    tmp_path: Any, redis_url: str, key_prefix: str
) -> None:
    """Database-per-tenant: one prefix, identical statements, two databases: two entries, each
    tenant reads its own rows. invalidate_all() of one prefix leaves another prefix's keys."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    tenant_a, tenant_b = _engine(tmp_path / "a"), _engine(tmp_path / "b")
    with tenant_b.begin() as conn:
        conn.execute(Account.__table__.update().values(email="tenant-b@example.com"))
    cache = Cache(redis_url, prefix=key_prefix)
    neighbour = Cache(redis_url, prefix=f"{key_prefix}-neighbour")
    try:
        for _ in range(2):
            for engine, email in ((tenant_a, "u1@example.com"), (tenant_b, "tenant-b@example.com")):
                with CachingSession(engine, cache=cache) as s:
                    assert s.get(Account, 1).email == email
                    assert [a.email for a in s.scalars(select(Account).where(Account.id == 1))] == [email]
            cache.wait_for_stores()
        assert cache.stats()["hits"] >= 2
        with CachingSession(tenant_a, cache=neighbour) as s:
            s.get(Account, 1)
        neighbour.wait_for_stores()
        client = redis.Redis.from_url(redis_url)
        theirs = set(client.scan_iter(f"{key_prefix}-neighbour:*"))
        assert theirs and len(_entry_keys(redis_url, key_prefix)) == 4  # 2 statements x 2 tenants
        cache.invalidate_all()
        assert not _entry_keys(redis_url, key_prefix)
        assert set(client.scan_iter(f"{key_prefix}-neighbour:*")) == theirs
        client.close()
    finally:
        neighbour.invalidate_all()
        cache.invalidate_all()
        cache.close()
        neighbour.close()
        tenant_a.dispose()
        tenant_b.dispose()


def test_security_benchmark_runs() -> None:
    """benchmarks/bench_security.py --quick runs and prints its tables (no timing is asserted)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_security.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "| no secret |" in proc.stdout and "| secret |" in proc.stdout


# -- a Redis shared with other applications: ACL users limited to their prefix ---------------------


def test_acl_user_limited_to_its_prefix(tmp_path: Any, redis_server: Any) -> None:
    """On a redis-server of the test's own (never the shared one): a user with only ``~app-a:*`` and
    ``&app-a:*`` (tests/acl.py) runs a cache under ``app-a`` with no error at all — misses, hits,
    commits, a near-cache, invalidate_all — and can neither read nor clear ``app-b``'s keys."""
    from tests.acl import add_user

    redis_server.resume()
    if not redis_server.running:
        redis_server.start()
    url_a = add_user(redis_server.url, "app-a", "app-a:")  # ~app-a:* &app-a:*
    engine = _engine(tmp_path)
    b = Cache(redis_server.url, prefix="app-b")  # another application (the default user)
    with CachingSession(engine, cache=b) as s:
        s.get(Account, 2)
    b.wait_for_stores()
    admin = redis.Redis.from_url(redis_server.url)
    theirs = {k: admin.get(k) for k in admin.scan_iter("app-b:*") if admin.type(k) == b"string"}
    assert theirs
    a = Cache(url_a, prefix="app-a", secret=SECRET, near_cache=True)
    try:
        for _ in range(3):
            with CachingSession(engine, cache=a) as s:
                assert s.get(Account, 1).email == "u1@example.com"
                assert [
                    x.id for x in s.scalars(select(Account).where(Account.email == "u2@example.com"))
                ] == [2]
            a.wait_for_stores()
        with CachingSession(engine, cache=a) as s:
            s.get(Account, 1).email = "changed@example.com"
            s.commit()
        with CachingSession(engine, cache=a) as s:
            assert s.get(Account, 1).email == "changed@example.com"
        a.invalidate_all()
        stats = a.stats()
        assert stats["errors"] == 0, stats
        assert stats["hits"] >= 2
        # (app-b's cache watches the same database: the commit above invalidated it too, as it must.)
        theirs = {k: admin.get(k) for k in admin.scan_iter("app-b:*") if admin.type(k) == b"string"}
        # The same credentials under another prefix: every call is refused (NOPERM); the reads are
        # right all the same (the database answers) and nothing of app-b's is touched.
        intruder = Cache(url_a, prefix="app-b")
        with CachingSession(engine, cache=intruder) as s:
            assert s.get(Account, 2).email == "u2@example.com"
        intruder.invalidate_all()
        assert intruder.stats()["errors"] > 0
        intruder.close()
        assert {k: admin.get(k) for k in admin.scan_iter("app-b:*") if admin.type(k) == b"string"} == theirs
        restricted = redis.Redis.from_url(url_a)
        with pytest.raises(redis.exceptions.NoPermissionError):
            restricted.get(next(iter(theirs)))
        restricted.close()
    finally:
        a.close()
        b.invalidate_all()
        b.close()
        admin.close()
        engine.dispose()


# -- limits against abuse --------------------------------------------------------------------------


def _entries(url: str, prefix: str) -> int:
    return len(_entry_keys(url, prefix))


def test_max_keys_per_shape_bounds_one_off_entries(tmp_path: Any, redis_url: str, key_prefix: str) -> None:
    engine = _engine(tmp_path)
    cache = Cache(redis_url, prefix=key_prefix, max_keys_per_shape=5)
    try:
        for i in range(30):  # a search box: one value per request
            with CachingSession(engine, cache=cache) as s:
                found = s.scalars(select(Account).where(Account.email == f"search-{i}")).all()
                assert found == []
        cache.wait_for_stores()
        # A first condition read registers its scheme (that store is refused), so up to 5 stored.
        assert 4 <= _entries(redis_url, key_prefix) <= 5
        assert cache.stats()["limited"] == 25
        with CachingSession(engine, cache=cache) as s:  # another shape stores as before
            assert s.get(Account, 1).email == "u1@example.com"
        cache.wait_for_stores()
        assert _entries(redis_url, key_prefix) <= 6 and cache.stats()["limited"] == 25
        for _ in range(2):  # reads beyond the limit are right, from the database
            with CachingSession(engine, cache=cache) as s:
                assert s.scalars(select(Account.id).where(Account.email == "u2@example.com")).all() == [2]
    finally:
        cache.invalidate_all()
        cache.close()
        engine.dispose()


async def test_async_stores_refused_by_the_limits_give_their_leases_back(
    tmp_path: Any, redis_url: str, key_prefix: str
) -> None:
    """Inside an AsyncSession the store is a task of the event loop: the limits refuse it there as
    in a sync session (``max_keys_per_shape``, ``max_entry_size``), counted, and the fill lease its
    miss took is given back at once — nobody waits for a fill that will not come."""
    _engine(tmp_path).dispose()
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'sec.db'}")
    client = redis.asyncio.Redis.from_url(redis_url)
    admin = redis.Redis.from_url(redis_url)
    cache = Cache(client, prefix=key_prefix, max_keys_per_shape=5)
    small = Cache(client, prefix=f"{key_prefix}-small", max_entry_size=10)
    try:
        for i in range(30):  # a search box: one value per request
            async with CachingAsyncSession(engine, cache=cache) as s:
                assert (await s.scalars(select(Account).where(Account.email == f"search-{i}"))).all() == []
        await cache.await_for_stores()
        assert 4 <= _entries(redis_url, key_prefix) <= 5
        assert cache.stats()["limited"] == 25
        for _ in range(2):
            async with CachingAsyncSession(engine, cache=small) as s:
                assert (await s.get(Account, 1)).email == "u1@example.com"
        await small.await_for_stores()
        assert small.stats()["too_large"] == 2 and small.stats()["hits"] == 0
        for prefix in (key_prefix, f"{key_prefix}-small"):
            assert list(admin.scan_iter(f"{prefix}:l:*")) == []  # every lease given back
    finally:
        await cache.ainvalidate_all()
        await small.ainvalidate_all()
        await cache.aclose()
        await small.aclose()
        await client.aclose()
        admin.close()
        await engine.dispose()


def test_max_bytes_stored_and_expiry(tmp_path: Any, redis_url: str, key_prefix: str) -> None:
    engine = _engine(tmp_path)
    cache = Cache(redis_url, prefix=key_prefix, max_bytes_stored=600, models={"*": {"ttl": 1.0}})
    try:
        for i in (1, 2):
            with CachingSession(engine, cache=cache) as s:
                s.get(Account, i)
            cache.wait_for_stores()
        with CachingSession(engine, cache=cache) as s:
            s.get(Typed, 1)  # a bigger entry: beyond the bytes left
        cache.wait_for_stores()
        assert cache.stats()["limited"] >= 1
        assert _entries(redis_url, key_prefix) < 3
        import time

        time.sleep(1.1)  # the entries this process stored have expired: room again
        with CachingSession(engine, cache=cache) as s:
            t = s.get(Typed, 1)
            assert t.d == TYPED["d"]
        cache.wait_for_stores()
        limited = cache.stats()["limited"]
        with CachingSession(engine, cache=cache) as s:
            s.get(Typed, 1)
        assert cache.stats()["hits"] >= 1 and cache.stats()["limited"] == limited
    finally:
        cache.invalidate_all()
        cache.close()
        engine.dispose()


def test_limit_configuration_errors() -> None:
    for name in ("max_keys_per_shape", "max_bytes_stored"):
        for bad in (0, -1, 1.5, True, "10"):
            with pytest.raises(ConfigurationError, match=name):
                Cache(**{name: bad})


def test_schema_per_tenant_never_shares_an_entry(pg_sync_url: str, redis_url: str, key_prefix: str) -> None:
    """Schema-per-tenant on PostgreSQL: one engine, one prefix, identical statements, the tenant
    chosen by ``schema_translate_map`` per engine: each tenant reads its own rows, from entries of
    its own."""
    from sqlalchemy import text

    schemas = [f"sec_tenant_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    admin = create_engine(pg_sync_url)
    with admin.begin() as conn:
        for schema in schemas:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine = create_engine(pg_sync_url)
    tenants = [engine.execution_options(schema_translate_map={None: schema}) for schema in schemas]
    for tenant, schema in zip(tenants, schemas):
        with tenant.begin() as conn:
            Account.__table__.create(conn)
            conn.execute(
                Account.__table__.insert(),
                [dict(id=1, email=f"{schema}@example.com", hashed_password="h", api_key="k")],
            )
    cache = Cache(redis_url, prefix=key_prefix)
    try:
        for _ in range(2):
            for tenant, schema in zip(tenants, schemas):
                with CachingSession(tenant, cache=cache) as s:
                    assert s.get(Account, 1).email == f"{schema}@example.com"
                    assert s.scalars(select(Account.email)).all() == [f"{schema}@example.com"]
        assert cache.stats()["hits"] == 4
        with CachingSession(tenants[0], cache=cache) as s:
            s.get(Account, 1).email = "changed@example.com"
            s.commit()
        with CachingSession(tenants[0], cache=cache) as s:
            assert s.get(Account, 1).email == "changed@example.com"
        # (Dependency names don't carry the translated schema: the commit evicted the other tenant's
        # entry of the same row too. An extra miss, never a stale or a foreign row.)
        with CachingSession(tenants[1], cache=cache) as s:
            assert s.get(Account, 1).email == f"{schemas[1]}@example.com"
    finally:
        cache.invalidate_all()
        cache.close()
        engine.dispose()
        with admin.begin() as conn:
            for schema in schemas:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def test_encryption_round_trips_every_postgres_codec_type(
    pg_sync_url: str, redis_url: str, key_prefix: str
) -> None:
    """Every column type of the codec's own PostgreSQL round trip (tests/test_codec.py), read
    through an encrypted cache: the hit gives back exactly what the database gave."""
    pytest.importorskip("cryptography")
    from tests.test_codec import _make_table, _pg_columns, _rows, exact

    suffix = uuid.uuid4().hex[:10]
    columns = [c for c in _pg_columns(suffix) if c[0] != "point"]  # a value the codec refuses
    metadata, table = _make_table(columns, f"sec_codec_{suffix}")
    engine = create_engine(pg_sync_url)
    cache = Cache(redis_url, prefix=key_prefix, encryption_key="encryption-key-0123456789")
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(table.insert(), _rows(columns))
        stmt = select(table).order_by(table.c.id)
        results = []
        for _ in range(2):
            with CachingSession(engine, cache=cache) as s:
                results.append(s.execute(stmt).all())
            cache.wait_for_stores()
        assert cache.stats()["hits"] == 1, cache.stats()
        db, hit = results
        assert len(db) == len(hit) == 5
        for a, b in zip(db, hit):
            for name, x, y in zip(stmt.selected_columns.keys(), a, b):
                assert type(x) is type(y) and exact(x) == exact(y), name
        [entry] = [v for k, v in _redis_values(redis_url, key_prefix).items() if b":e:" in k]
        assert b"multi" not in entry and b"2024" not in entry
    finally:
        cache.invalidate_all()
        cache.close()
        metadata.drop_all(engine)
        engine.dispose()


async def test_async_excluded_deferred_column_behaves_the_same_from_the_cache(
    tmp_path: Any, redis_url: str, key_prefix: str
) -> None:
    """With an AsyncSession an excluded column mapped deferred() is unloaded whether the object
    came from the database or the cache, and loads the same way (refresh); never in Redis."""
    from sqlalchemy import inspect as sa_inspect

    _engine(tmp_path).dispose()
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'sec.db'}")
    client = redis.asyncio.Redis.from_url(redis_url)
    cache = Cache(client, prefix=key_prefix, secret=SECRET)
    try:
        for _ in range(2):
            async with CachingAsyncSession(engine, cache=cache) as s:
                m = await s.get(Member, 1)
                assert m.name == "ann"
                assert "hashed_password" in sa_inspect(m).unloaded
                await s.refresh(m, ["hashed_password"])
                assert m.hashed_password == HASH
                rows = (await s.scalars(select(Member).where(Member.name == "ann"))).all()
                assert rows == [m]
            await cache.await_for_stores()
        assert cache.stats()["hits"] >= 1
        for value in _redis_values(redis_url, key_prefix).values():
            assert b"SECRETHASH" not in value
    finally:
        await cache.ainvalidate_all()
        await cache.aclose()
        await client.aclose()
        await engine.dispose()
