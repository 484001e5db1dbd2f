"""What every integration shares: the core imports none of the frameworks; an integration imported
without its extra says which extra to install; a caching async session whose sync side would not
cache refuses to exist instead of silently caching nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

from sqlacache import CachingAsyncSession, ConfigurationError

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ["sqlmodel", "flask", "flask_sqlalchemy", "litestar", "advanced_alchemy", "fastapi"]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_the_core_imports_no_framework():
    proc = _run(
        f"""
        import sys
        import sqlacache, sqlacache.pytest_plugin
        from sqlacache import Cache
        Cache().close()
        loaded = [m for m in {FRAMEWORKS!r} if m in sys.modules]
        assert not loaded, loaded
        """
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("sqlacache.sqlmodel", "sqlmodel", "sqlmodel"),
        ("sqlacache.flask", "flask_sqlalchemy", "flask"),
        ("sqlacache.litestar", "litestar", "litestar"),
    ],
)
def test_an_integration_without_its_extra_names_the_extra(module, blocked, extra):
    # sys.modules[name] = None makes "import name" fail, as if the package were not installed.
    proc = _run(
        f"""
        import sys
        sys.modules[{blocked!r}] = None
        try:
            import {module}
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("imported without {blocked}")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert f'pip install "sqlacache[{extra}]"' in proc.stdout


def test_caching_async_session_with_a_plain_sync_session_refuses_to_exist(tmp_path):
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ConfigurationError, match="not a CachingSession: it would cache nothing"):
        CachingAsyncSession(engine, sync_session_class=Session)


def test_advanced_alchemy_session_class_gets_the_plugin_as_the_fix(tmp_path):
    pytest.importorskip("advanced_alchemy")
    from advanced_alchemy.config import AsyncSessionConfig, SQLAlchemyAsyncConfig

    config = SQLAlchemyAsyncConfig(
        connection_string=f"sqlite+aiosqlite:///{tmp_path / 'aa.db'}",
        session_config=AsyncSessionConfig(class_=CachingAsyncSession),
    )
    # advanced-alchemy swaps the sync side for a sessionmaker of plain Sessions.
    with pytest.raises(ConfigurationError, match="SQLACachePlugin"):
        config.create_session_maker()()
