"""README.rst's usage snippets run as written (against this machine's Redis, under a private prefix)."""

from __future__ import annotations

import ast
import asyncio
import re
import sys
import types
from pathlib import Path

import pytest
from sqlalchemy import ForeignKey, create_engine, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

README = Path(__file__).resolve().parent.parent / "README.rst"


def _usage_blocks() -> list[str]:
    text = README.read_text()
    usage = text[text.index("\nUsage\n-----") : text.index("\nConfiguration reference\n")]
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", usage)
    return [re.sub(r"^   ", "", b, flags=re.M) for b in blocks]


class ReadmeBase(DeclarativeBase):
    pass


class User(ReadmeBase):
    __tablename__ = "readme_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    active: Mapped[bool] = mapped_column(default=True)


class Product(ReadmeBase):
    __tablename__ = "readme_products"
    id: Mapped[int] = mapped_column(primary_key=True)


class Report(ReadmeBase):
    __tablename__ = "readme_reports"
    id: Mapped[int] = mapped_column(primary_key=True)
    year: Mapped[int]
    user_id: Mapped[int | None] = mapped_column(ForeignKey("readme_users.id"))


@pytest.fixture
def app_models(monkeypatch):
    """The README names ``"app.models.Product"``: make that importable."""
    app = types.ModuleType("app")
    models = types.ModuleType("app.models")
    for cls in (User, Product, Report):
        setattr(models, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "app", app)
    monkeypatch.setitem(sys.modules, "app.models", models)
    return models


def _source(block: str, redis_url: str, prefix: str) -> str:
    assert '"redis://localhost:6379/0"' in block and 'prefix="sqlacache"' in block
    return block.replace('"redis://localhost:6379/0"', repr(redis_url)).replace(
        'prefix="sqlacache"', f"prefix={prefix!r}"
    )


def test_the_usage_snippets_run_as_written(tmp_path, redis_url, key_prefix, app_models):
    sync_block, async_block = _usage_blocks()[:2]  # the third, Flask, is tests/test_flask_sqlalchemy.py
    engine = create_engine(f"sqlite:///{tmp_path / 'readme.db'}")
    ReadmeBase.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=42), Product(id=1), Report(id=1, year=2024, user_id=42)])
        s.commit()
    sql: list[str] = []
    from sqlalchemy import event

    event.listen(engine, "before_cursor_execute", lambda c, cur, statement, *a: sql.append(statement))
    namespace = {"engine": engine, "User": User, "Report": Report, "Product": Product}
    code = compile(_source(sync_block, redis_url, key_prefix), "README.rst", "exec")
    exec(code, namespace)
    first_run = len(sql)
    namespace["cache"].close()
    exec(code, namespace)  # as another process would: a new Cache on the same Redis
    cache = namespace["cache"]
    assert len(sql) - first_run < first_run  # served (partly) from the cache
    assert cache.stats()["hits"] >= 3, cache.stats()

    aengine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'readme.db'}")
    namespace.update(engine=aengine, select=select)
    code = compile(async_block, "README.rst", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)

    async def run() -> None:
        for _ in range(3):
            await eval(code, namespace)
        await aengine.dispose()

    asyncio.run(run())
    assert [u.id for u in namespace["rows"]] == [42]
    assert namespace["user"].id == 42
    cache.invalidate_all()
    cache.close()
    engine.dispose()


def _section_blocks(title: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n{title}\n")
    end = text.index("\n---", start + len(title) + 10)  # the next section's underline
    section = text[start : text.rindex("\n", start, end)]
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", section)
    return [re.sub(r"^   ", "", b, flags=re.M) for b in blocks]


def test_the_near_cache_snippet_runs_as_written(tmp_path, redis_url, key_prefix):
    (block,) = _section_blocks("Near-cache")
    namespace: dict[str, object] = {}
    exec(compile(_source(block, redis_url, key_prefix), "README.rst", "exec"), namespace)
    cache = namespace["cache"]
    engine = create_engine(f"sqlite:///{tmp_path / 'near.db'}")
    ReadmeBase.metadata.create_all(engine)
    from sqlacache import CachingSession

    with Session(engine) as s:
        s.add(User(id=7))
        s.commit()
    try:
        for _ in range(3):  # a miss, a hit from Redis (taken into memory), a hit from memory
            with CachingSession(engine, cache=cache) as s:
                assert s.get(User, 7).id == 7
            cache.wait_for_stores()
        stats = cache.stats()
        assert stats["near_hits"] == 1 and stats["hits"] == 2 and stats["near_in_step"], stats
    finally:
        cache.invalidate_all()
        cache.close()
        engine.dispose()


class TrackerBase(DeclarativeBase):
    pass


class TrackerUser(TrackerBase):  # the README's "users" table
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    active: Mapped[bool] = mapped_column(default=True)


def test_the_tracker_snippet_runs_as_written(tmp_path, redis_url, key_prefix):
    from sqlalchemy.orm import sessionmaker

    from sqlacache import Cache, CachingSession

    (block,) = _section_blocks("What a commit evicts")
    engine = create_engine(f"sqlite:///{tmp_path / 'tracker.db'}")
    TrackerBase.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(TrackerUser(id=42))
        s.commit()
    cache = Cache(backend=redis_url, prefix=key_prefix)
    maker = sessionmaker(engine, class_=CachingSession, cache=cache)
    exec(compile(block, "README.rst", "exec"), {"Session": maker, "User": TrackerUser})
    with Session(engine) as s:
        assert s.get(TrackerUser, 42).active is False
    cache.close()
    engine.dispose()


def test_the_readme_is_valid_restructuredtext() -> None:
    """PyPI renders README.rst as the project's page: a malformed table or title must fail here."""
    import docutils.core
    import docutils.utils

    try:
        docutils.core.publish_doctree(
            README.read_text(), settings_overrides={"report_level": 2, "halt_level": 2}
        )
    except docutils.utils.SystemMessage as exc:
        pytest.fail(f"README.rst: {exc}")
