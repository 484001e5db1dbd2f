"""Metrics sinks with the real libraries: Prometheus (scraped text) and OpenTelemetry (SDK reader),
after real cached reads and commits, on SQLite + the memory backend and PostgreSQL + Redis."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text
from sqlalchemy.orm import sessionmaker

from sqlacache import Cache, CachingSession, ConfigurationError
from sqlacache.metrics import LogEvents, OpenTelemetryMetrics, PrometheusCollector
from tests.helpers import aseed, seed
from tests.models import Base, User

WORLDS = pytest.mark.parametrize(
    "world", ["sqlite+memory", "postgres+redis", "postgres+redis+near"], indirect=True
)


def activity(world: Any) -> None:
    """Three gets of one row (a miss then two hits), a refused read, and a committed update."""
    for _ in range(2):
        with world.Session() as s:
            s.get(User, 1)
    with world.Session() as s:
        s.execute(select(User).where(text("users.id = 2"))).all()
        s.get(User, 1).name = "renamed"
        s.commit()
    world.cache.wait_for_stores()


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    scraped = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scraped)
        for s in family.samples
    }


@WORLDS
def test_prometheus_scrape_counts_reads_by_model_and_op(world):
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(world.cache))
    seed(world)
    activity(world)
    found = samples(registry)
    assert found[("sqlacache_reads_total", (("model", "User"), ("op", "get"), ("result", "miss")))] == 1
    assert found[("sqlacache_reads_total", (("model", "User"), ("op", "get"), ("result", "hit")))] == 2
    assert found[("sqlacache_refusals_total", (("model", "User"), ("op", "fetch"), ("reason", "text")))] == 1
    assert found[("sqlacache_fills_total", (("model", "User"), ("op", "get")))] == 1
    assert found[("sqlacache_evictions_total", (("table", "users"),))] >= 1
    assert found[("sqlacache_stores_total", (("result", "stored"),))] >= 1
    assert found[("sqlacache_invalidations_total", ())] >= 2  # the seed's commit and the update's
    assert found[("sqlacache_breaker_open", ())] == 0
    stats = world.cache.stats()
    assert found[("sqlacache_events_total", (("event", "hits"),))] == stats["hits"]
    assert found[("sqlacache_state", (("gauge", "pending_invalidations"),))] == 0
    # a read's lookup is a "lease" where the backend takes the right to fill with it (Redis)
    call = "lease" if ("sqlacache_backend_call_seconds_count", (("call", "lease"),)) in found else "lookup"
    lookups = found[("sqlacache_backend_call_seconds_count", (("call", call),))]
    assert lookups >= 2
    assert found[("sqlacache_backend_call_seconds_bucket", (("call", call), ("le", "+Inf")))] == lookups


def test_prometheus_counts_backend_errors_by_call_and_kind(tmp_path, key_prefix, caplog):
    engine = sa.create_engine(f"sqlite:///{tmp_path}/m.db")
    Base.metadata.create_all(engine)
    cache = Cache("redis://127.0.0.1:1/0", prefix=key_prefix)  # nothing listens there
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(cache, namespace="app_cache"))
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with caplog.at_level(logging.WARNING, logger="sqlacache"), Session() as s:
        assert s.get(User, 1) is None  # from the database: the outage is not the caller's
    # the warning carries the same labels as the metric
    warned = [r for r in caplog.records if getattr(r, "sqlacache_event", None) == "errors"]
    assert warned and warned[0].sqlacache_reason == "connection"  # type: ignore[attr-defined]
    found = samples(registry)
    errors = {labels: v for (name, labels), v in found.items() if name == "app_cache_errors_total"}
    assert errors and all(dict(labels)["kind"] for labels in errors)
    assert {dict(labels)["call"] for labels in errors} & {"lookup", "lease"}
    cache.close()
    engine.dispose()


@WORLDS
def test_opentelemetry_reader_sees_the_same_counts(world):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    sink = OpenTelemetryMetrics(world.cache, meter_provider=provider)
    seed(world)
    activity(world)
    points: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)

    def value(name: str, **attrs: str) -> Any:
        return [p for p in points[name] if dict(p.attributes) == attrs]

    assert value("sqlacache.hits", model="User", op="get")[0].value == 2
    assert value("sqlacache.misses", model="User", op="get")[0].value == 1
    assert value("sqlacache.refusals", model="User", op="fetch", reason="text")[0].value == 1
    assert value("sqlacache.evictions", table="users")[0].value >= 1
    assert value("sqlacache.stores", result="stored")[0].value >= 1
    assert value("sqlacache.events", event="misses")[0].value == 1
    duration = (
        value("sqlacache.backend.duration", call="lookup")
        or value("sqlacache.backend.duration", call="lease")
    )[0]
    assert duration.count >= 2 and duration.sum > 0
    assert list(duration.explicit_bounds)[:2] == [0.0001, 0.00025]
    sink.close()
    provider.shutdown()


def test_structured_log_records_carry_the_labels(tmp_path, caplog):
    engine = sa.create_engine(f"sqlite:///{tmp_path}/l.db")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(User), [{"id": 1, "name": "a"}])
    cache = Cache("memory://")
    sink = LogEvents(cache)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with caplog.at_level(logging.INFO, logger="sqlacache.events"):
        for _ in range(2):
            with Session() as s:
                s.get(User, 1)
    events = [(r.sqlacache_event, r.sqlacache_model, r.sqlacache_op) for r in caplog.records]  # type: ignore[attr-defined]
    assert events == [("misses", "User", "get"), ("fills", "User", "get"), ("hits", "User", "get")]
    sink.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sqlacache.events"), Session() as s:
        s.get(User, 1)
    assert not caplog.records
    cache.close()
    engine.dispose()


def test_without_a_sink_nothing_is_recorded_per_model(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path}/z.db")
    Base.metadata.create_all(engine)
    cache = Cache("memory://")
    with sessionmaker(engine, class_=CachingSession, cache=cache)() as s:
        s.get(User, 1)
    assert cache.count.recorder is None  # the read path's only cost: checking this attribute
    assert cache.stats()["misses"] == 1
    cache.close()


def test_wrong_inputs_are_configuration_errors():
    cache = Cache("memory://")
    with pytest.raises(ConfigurationError, match="namespace='bad-name'"):
        PrometheusCollector(cache, namespace="bad-name")
    with pytest.raises(ConfigurationError, match="MeterProvider"):
        OpenTelemetryMetrics(cache, meter_provider="otel")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="prefix='my cache'"):
        OpenTelemetryMetrics(cache, prefix="my cache")
    with pytest.raises(ConfigurationError, match=r"logging\.Logger"):
        LogEvents(cache, logger="sqlacache")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="level='debug'"):
        LogEvents(cache, level="debug")  # type: ignore[arg-type]
    cache.close()


@pytest.mark.parametrize("aworld", ["aiosqlite+memory", "asyncpg+redis"], indirect=True)
async def test_async_sessions_are_counted_alike(aworld):
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(aworld.cache))
    await aseed(aworld)
    for _ in range(2):
        async with aworld.Session() as s:
            (await s.execute(select(User).where(User.name == "u1"))).scalars().all()
    await aworld.cache.await_for_stores()
    found = samples(registry)
    assert found[("sqlacache_reads_total", (("model", "User"), ("op", "fetch"), ("result", "miss")))] == 1
    assert found[("sqlacache_reads_total", (("model", "User"), ("op", "fetch"), ("result", "hit")))] == 1
    assert sum(v for (name, _), v in found.items() if name == "sqlacache_backend_call_seconds_count") >= 2


def test_nested_loads_of_an_unconfigured_model_are_not_refusals(tmp_path):
    """selectinload(User.orders) with only User configured: the orders are in User's entry."""
    from sqlalchemy.orm import selectinload

    from tests.models import Order

    engine = sa.create_engine(f"sqlite:///{tmp_path}/n.db")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(User), [{"id": 1, "name": "a"}])
        conn.execute(sa.insert(Order), [{"id": 1, "user_id": 1, "total": 5}])
    cache = Cache("memory://", models={User: {"ops": "all"}})
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(cache))
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    stmt = select(User).options(selectinload(User.orders))
    for _ in range(3):  # (a first store may be refused: the read registered its condition scheme)
        with Session() as s:
            assert [o.total for u in s.scalars(stmt) for o in u.orders] == [5]
    with Session() as s:
        s.scalars(select(Order)).all()  # a read of its own: that one is refused
    found = samples(registry)
    refusals = {labels: v for (name, labels), v in found.items() if name == "sqlacache_refusals_total"}
    assert refusals == {(("model", "Order"), ("op", "fetch"), ("reason", "not_configured")): 1}
    assert found[("sqlacache_reads_total", (("model", "User"), ("op", "fetch"), ("result", "hit")))] >= 1
    cache.close()
    engine.dispose()


def test_the_core_and_the_module_import_without_the_optional_libraries():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "sys.modules['opentelemetry'] = None\n"
        "import sqlacache, sqlacache.metrics\n"
        "from sqlacache.metrics import LogEvents\n"
        "for name in ('PrometheusCollector', 'OpenTelemetryMetrics'):\n"
        "    try:\n"
        "        getattr(sqlacache.metrics, name)\n"
        "    except ImportError as exc:\n"
        "        print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'sqlacache[prometheus]'" in out
    assert "pip install 'sqlacache[opentelemetry]'" in out
