"""Configuration: the documented entry points work, and bad input fails early with a clear message."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

import sqlacache
from sqlacache import Cache, CachingSession, ConfigurationError
from sqlacache import cache as cache_module
from tests.helpers import seed
from tests.models import Base, Order, User


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"models": {User: {"ops": {"fetch", "gett"}}}}, "unknown op"),
        ({"models": {User: {"ttl": -1}}}, "positive number"),
        ({"models": {User: {"ttl": "60"}}}, "positive number"),
        ({"models": {User: {"ops": "all", "expire": 3}}}, "unknown key"),
        ({"models": {User: {"ttl": 1, "timeout": 2}}}, "not both"),
        ({"models": {"tests.models.Nope": {}}}, "no attribute"),
        ({"models": {"nowhere.models.User": {}}}, "cannot import"),
        ({"models": {"User": {}}}, "dotted path"),
        ({"models": {int: {}}}, "not a mapped class"),
        ({"backend": "memcached://x"}, "unknown scheme"),
        ({"backend": 42}, "not a URL"),
        ({"default_ttl": 0}, "positive number"),
        ({"prefix": "a b"}, "prefix"),
        ({"default_ttl": 1, "default_timeout": 2}, "not both"),
        ({"fill_timeout": -1}, "fill_timeout=-1: give a non-negative number"),
        ({"refresh_ahead": 1.0}, "refresh_ahead=1.0: give the fraction of a TTL"),
        ({"refresh_ahead": -0.1}, "refresh_ahead"),
        ({"max_entry_size": 0}, "max_entry_size=0: give a positive number"),
        ({"max_entry_size": "1MB"}, "max_entry_size"),
        ({"breaker_cooldown": 0}, "breaker_cooldown=0: give a positive number"),
        ({"breaker_max_cooldown": float("inf")}, "breaker_max_cooldown"),
        # One wrong input per option: a wrong type, NaN/inf, negative, zero where it makes no sense.
        ({"models": {User: {"ttl": float("nan")}}}, r"models\[.*positive number of seconds, finite"),
        ({"default_ttl": float("inf")}, "default_ttl: a TTL must be a positive number of seconds, finite"),
        ({"default_timeout": float("nan")}, "default_ttl"),
        ({"socket_timeout": -1}, "socket_timeout=-1: give a positive number"),
        ({"socket_timeout": 0}, "socket_timeout=0: give a positive number"),
        ({"socket_timeout": "50ms"}, "socket_timeout='50ms'"),
        ({"socket_timeout": float("nan")}, "socket_timeout=nan"),
        ({"refresh_ahead": "0.1"}, "refresh_ahead='0.1': give a non-negative number"),
        ({"refresh_ahead": float("nan")}, "refresh_ahead=nan"),
        ({"max_entries": 0}, r"max_entries=0: give how many entries .* \(an int >= 1\)"),
        ({"max_entries": 1.5}, "max_entries=1.5"),
        ({"enabled": "false"}, "enabled='false': give True or False"),
        ({"background_stores": 1}, "background_stores=1: give True or False"),
        ({"fill_timeout": float("nan")}, "fill_timeout=nan"),
        ({"condition_in_limit": 2.5}, "condition_in_limit=2.5"),
        ({"invalidation": "rows"}, "invalidation='rows'"),
        ({"prefix": ""}, "prefix"),
        ({"models": [User]}, "models must be a dict"),
        (
            {"breaker_cooldown": 2, "breaker_max_cooldown": 1},
            "breaker_max_cooldown=1 is below breaker_cooldown=2",
        ),
        # URL parts redis-py would ignore (database 0) or fail on at the first command.
        ({"backend": "redis://127.0.0.1:1/abc"}, "the path '/abc' is not a database number"),
        ({"backend": "redis://127.0.0.1:1/0/extra"}, "is not a database number"),
        ({"backend": "redis://127.0.0.1:port/0"}, "Port could not be cast"),
        ({"backend": "redis://127.0.0.1:1/0?db=x"}, "Invalid value for 'db'"),
        (
            {"backend": "redis://127.0.0.1:1/0?sokcet_timeout=1"},
            r"unknown query parameter\(s\) \['sokcet_timeout'\]",
        ),
        ({"backend": "unix://"}, "no socket path"),
        # The near-cache's options are checked with near_cache off too: a typo is refused now, not
        # on the day the flag is turned on.
        ({"near_coherence": "eventual"}, "near_coherence='eventual': use 'strict'"),
        ({"near_max_entries": 0}, "near_max_entries=0: give an int >= 1"),
        ({"near_max_bytes": "64MB"}, "near_max_bytes='64MB': give an int >= 1"),
        ({"near_ttl": 0}, "near_ttl=0: give a positive number"),
        ({"near_heartbeat": float("nan")}, "near_heartbeat=nan: give a positive number"),
        ({"backend": "redis://:s3cret@127.0.0.1:1/x"}, r"redis://:\*\*\*@127"),  # the password isn't shown
    ],
)
def test_bad_configuration_is_refused_at_construction(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        Cache(**kwargs)


def test_dotted_paths_aliases_and_fallback():
    cache = Cache(
        models={"tests.models.User": {"ops": {"get"}, "timeout": 900}, "*": {"ttl": 60}},
        default_timeout=30,
    )
    assert cache.policy.rule_for(User).ops == {"get"} and cache.policy.rule_for(User).ttl == 900
    assert cache.policy.rule_for(Order).ttl == 60
    assert Cache(models={User: {}}, default_ttl=5).policy.rule_for(Order) is None
    assert Cache().policy.rule_for(Order).ops == {"get", "fetch", "count", "exists"}


def _seeded_reads(tmp_path, cache):
    """Seed a SQLite database, then run a get and a list three times; returns the SQL sent."""
    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    Base.metadata.create_all(engine)
    sql = []
    from sqlalchemy import event

    event.listen(engine, "before_cursor_execute", lambda *a: sql.append(a[2]))
    S = sessionmaker(engine, class_=CachingSession, cache=cache)

    class W:
        Session = S

    seed(W)
    for _ in range(3):
        with S() as s:
            s.get(User, 1)
            s.scalars(select(User)).all()
    return sql


def test_ops_decide_what_is_cached(tmp_path):
    sql = _seeded_reads(tmp_path, Cache(models={User: {"ops": {"get"}}}))
    assert sum("WHERE users.id = ?" in q for q in sql) == 1  # get: stored by its first miss, then hit
    assert sum(q.startswith("SELECT users.id") and "WHERE" not in q for q in sql) == 3  # fetch: never


def test_configure_sets_the_default_cache_and_bind_caches_plain_sessions(tmp_path):
    previous = cache_module._default
    try:
        cache_module._default = None
        engine = create_engine(f"sqlite:///{tmp_path / 'd.db'}")
        Base.metadata.create_all(engine)
        with pytest.raises(ConfigurationError, match="configure"):
            CachingSession(engine)
        # A URL where the Cache goes: said at the first session, not as an AttributeError later.
        with pytest.raises(ConfigurationError, match=r"cache='memory://' is not a sqlacache\.Cache"):
            sessionmaker(engine, class_=CachingSession, cache="memory://")()
        cache = sqlacache.configure(backend="mem://", models={"*": {"ttl": 60}})
        assert sqlacache.default_cache() is cache
        with CachingSession(engine) as s:
            assert s.cache is cache
        sql = []
        from sqlalchemy import event

        event.listen(engine, "before_cursor_execute", lambda *a: sql.append(a[2]))
        assert cache.bind(engine).cache is cache
        try:
            with Session(engine) as s:
                s.add(User(id=1, name="plain"))
                s.commit()
            for _ in range(3):
                with Session(engine) as s:
                    assert s.scalars(select(User)).one().name == "plain"
            assert sum(q.startswith("SELECT") for q in sql) == 1
            with Session(engine) as s:
                s.scalars(select(User)).one().name = "changed"
                s.commit()
            with Session(engine) as s:
                assert s.scalars(select(User)).one().name == "changed"
        finally:
            cache.unbind(engine)
    finally:
        cache_module._default = previous


def test_disabled_cache_is_a_pass_through(tmp_path):
    cache = Cache(enabled=False)
    sql = _seeded_reads(tmp_path, cache)
    assert cache.stats()["hits"] == cache.stats()["misses"] == 0
    assert sum(q.startswith("SELECT users") for q in sql) == 6


def test_plain_sessions_are_untouched_when_nothing_is_bound(tmp_path):
    """Importing sqlacache registers global listeners; sessions it doesn't cache must not notice."""
    engine = create_engine(f"sqlite:///{tmp_path / 'p.db'}")
    Base.metadata.create_all(engine)
    sql = []
    from sqlalchemy import event, literal

    event.listen(engine, "before_cursor_execute", lambda *a: sql.append(a[2]))
    with Session(engine) as s:
        s.add(User(id=1, name="plain"))
        s.flush()
        assert s.execute(select(literal(1))).scalar() == 1
        assert s.execute(select(literal(2))).scalar() == 2
        s.commit()
    for _ in range(3):
        with Session(engine) as s:
            assert s.get(User, 1).name == "plain"
            assert s.scalars(select(User)).one().name == "plain"
    assert sum(q.startswith("SELECT users") for q in sql) == 6  # every read reached the database


def test_a_redis_client_that_would_hang_on_a_hung_redis_is_warned_about(caplog):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    with caplog.at_level("WARNING", logger="sqlacache"):
        Cache(backend=redis.Redis(host="127.0.0.1", port=1, socket_timeout=None))
        Cache(backend=redis.Redis(host="127.0.0.1", port=1, socket_timeout=5))
    assert "socket_timeout is unset" in caplog.text and "socket_timeout is 5 s" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sqlacache"):
        retry = Retry(NoBackoff(), 3)  # retries timeouts too
        Cache(backend=redis.Redis(host="127.0.0.1", port=1, socket_timeout=0.05, retry=retry))
    assert "retries timeouts 3 times" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sqlacache"):
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        Cache(backend=redis.Redis(host="127.0.0.1", port=1, socket_timeout=0.05, retry=retry))
        Cache(backend="redis://127.0.0.1:1/0")
    assert caplog.text == ""


def test_valid_urls_are_accepted_and_a_down_redis_is_not_an_error_at_start_up():
    from tests.faults import free_port

    port = free_port()  # nothing listens there
    for url in (
        f"redis://127.0.0.1:{port}",
        f"redis://127.0.0.1:{port}/",
        f"redis://127.0.0.1:{port}/3",
        f"redis://127.0.0.1:{port}/3?socket_keepalive=true&health_check_interval=10",
        f"redis://127.0.0.1:{port}?db=2",
        "unix:///nonexistent/redis.sock?db=1",
    ):
        cache = Cache(backend=url)
        assert cache.stats()["errors"] == 0
        cache.close()


def test_a_database_index_redis_rejects_fails_at_construction_with_its_own_message(redis_url):
    from urllib.parse import urlsplit

    where = urlsplit(redis_url)
    with pytest.raises(ConfigurationError) as raised:
        Cache(backend=f"redis://{where.hostname}:{where.port or 6379}/999")
    message = str(raised.value)
    assert "DB index is out of range" in message  # Redis's own words
    assert "database 999 does not exist on that server" in message and "'redis://host:6379/0'" in message


def test_redis_errors_at_first_use_show_the_servers_message(redis_url, caplog):
    """A client passed in is not probed at construction; its first failure names Redis's reason."""
    from urllib.parse import urlsplit

    import redis
    from sqlalchemy import create_engine

    from tests.models import Base

    where = urlsplit(redis_url)
    client = redis.Redis(
        host=where.hostname or "127.0.0.1", port=where.port or 6379, db=999, socket_timeout=0.5
    )
    cache = Cache(backend=client)
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with caplog.at_level("WARNING", logger="sqlacache"), CachingSession(engine, cache=cache) as s:
        assert s.get(User, 1) is None
    assert "ResponseError: DB index is out of range" in caplog.text


def _one_user(tmp_path):
    """A memory cache and a CachingSession factory on a SQLite file holding User 1 ("u1")."""
    engine = create_engine(f"sqlite:///{tmp_path / 'one.db'}")
    Base.metadata.create_all(engine)
    cache = Cache()
    S = sessionmaker(engine, class_=CachingSession, cache=cache)
    with S() as s:
        s.add(User(id=1, name="u1"))
        s.commit()
    return cache, S


def test_a_session_used_after_cache_close_raises_instead_of_queueing_evictions(tmp_path):
    from sqlacache import CacheClosedError

    cache, S = _one_user(tmp_path)
    held = S()
    assert held.get(User, 1).name == "u1"
    cache.close()
    with pytest.raises(
        CacheClosedError, match=r"Cache is closed \(cache.close\(\) was called\).*Make sessions"
    ):
        S()
    with pytest.raises(CacheClosedError):
        held.scalars(select(User)).all()
    held.add(User(id=2, name="u2"))
    with pytest.raises(CacheClosedError, match="from a Cache that is open"):
        held.commit()
    held.rollback()
    held.close()  # closing (and a with block's exit) still works
    assert cache.stats()["pending_invalidations"] == 0


def test_plain_sessions_bound_to_a_closed_cache_go_back_to_the_database(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'unbound.db'}")
    Base.metadata.create_all(engine)
    cache = Cache()
    cache.bind(engine)
    with Session(engine) as s:
        s.add(User(id=1, name="u1"))
        s.commit()
    cache.close()
    with Session(engine) as s:
        assert s.get(User, 1).name == "u1"
        s.get(User, 1).name = "u2"
        s.commit()
    assert cache.stats()["pending_invalidations"] == 0 and cache.stats()["errors"] == 0


async def test_an_async_session_used_after_cache_close_raises(tmp_path):
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from sqlacache import CacheClosedError, CachingAsyncSession

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'aclosed.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    cache = Cache()
    S = async_sessionmaker(engine, class_=CachingAsyncSession, cache=cache, expire_on_commit=False)
    async with S() as s:
        s.add(User(id=1, name="u1"))
        await s.commit()
        await cache.aclose()
        with pytest.raises(CacheClosedError):
            await s.get(User, 2)
        s.add(User(id=2, name="u2"))
        with pytest.raises(CacheClosedError):
            await s.commit()
    await engine.dispose()


def test_the_memory_backend_warns_once_in_a_process_forked_after_the_cache_was_created(tmp_path, caplog):
    """memory:// is per process: forked workers would each keep their own entries, and a commit in
    one would not evict the others' (stale reads). A real fork, as a pre-forking server does."""
    import logging
    import multiprocessing

    _cache, S = _one_user(tmp_path)

    def worker(conn):
        seen = []
        handler = logging.Handler()
        handler.emit = lambda record: seen.append(record.getMessage())
        logging.getLogger("sqlacache").addHandler(handler)
        for _ in range(3):
            with S() as s:
                s.get(User, 1)
        conn.send([m for m in seen if "forked" in m])
        conn.close()

    with caplog.at_level("WARNING", logger="sqlacache"):
        for _ in range(3):
            with S() as s:
                s.get(User, 1)
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=worker, args=(child,))
        process.start()
        warnings = parent.recv()
        process.join(10)
        with S() as s:
            s.get(User, 1)
    assert len(warnings) == 1, warnings
    assert "memory:// cache is used in a process forked" in warnings[0] and "backend='redis://" in warnings[0]
    assert "forked" not in caplog.text  # the process that created it is not warned


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # A truthy "no" used to cache; 0 used to fall back to the default TTL; "60" failed every store.
        ({"cache": "no"}, r"execution_options=\{'cache': 'no'\}: give False \(bypass"),
        ({"cache": 0}, r"execution_options=\{'cache': 0\}"),
        ({"cache_ttl": 0}, r"execution_options=\{'cache_ttl': 0\}: a TTL must be a positive number"),
        ({"cache_ttl": "60"}, r"execution_options=\{'cache_ttl': '60'\}"),
    ],
)
@pytest.mark.parametrize("call", ["get", "execute", "statement"])
def test_bad_per_call_options_are_refused(tmp_path, options, message, call):
    engine = create_engine(f"sqlite:///{tmp_path / 'p.db'}")
    Base.metadata.create_all(engine)
    cache = Cache()
    try:
        with CachingSession(engine, cache=cache) as s, pytest.raises(ConfigurationError, match=message):
            if call == "get":
                s.get(User, 1, execution_options=options)
            elif call == "execute":
                s.execute(select(User), execution_options=options)
            else:
                s.execute(select(User).execution_options(**options))
        assert cache.stats()["errors"] == 0  # refused as the caller's mistake, not logged as ours
    finally:
        cache.close()
        engine.dispose()
