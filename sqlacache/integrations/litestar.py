"""Litestar (with advanced-alchemy): a plugin that caches the sessions of an ``SQLAlchemyAsyncConfig``.

advanced-alchemy builds its own session factory (and registers its listeners — ``updated_at``
stamping, file objects — on the sync session it proxies), so the plugin leaves it alone: it gives
the config's engine to the cache (``Cache.bind``) when the app starts, and closes the cache when it
stops. Every session advanced-alchemy makes on that engine — its repositories' and services'
``get``, ``list``, ``count``, ``exists`` — then reads through the cache, and every commit evicts
what it changed. Needs the ``litestar`` extra (``pip install "sqlacache[litestar]"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from litestar.config.app import AppConfig
    from litestar.plugins import InitPluginProtocol
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError('sqlacache.litestar needs Litestar: pip install "sqlacache[litestar]"') from exc

from sqlacache.cache import Cache
from sqlacache.policy import ConfigurationError

__all__ = ["SQLACachePlugin"]


def _shown(value: Any) -> str:
    """A wrong argument as an error message shows it: an advanced-alchemy config's repr is pages long."""
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__}"


class SQLACachePlugin(InitPluginProtocol):
    """Caches the sessions of advanced-alchemy configs in a Litestar app::

        alchemy = SQLAlchemyAsyncConfig(connection_string="sqlite+aiosqlite:///app.db", ...)
        cache = Cache(backend="redis://localhost:6379/0")
        app = Litestar(..., plugins=[SQLAlchemyPlugin(config=alchemy), SQLACachePlugin(cache, alchemy)])

    ``configs``: one or more ``SQLAlchemyAsyncConfig``/``SQLAlchemySyncConfig`` (anything with
    ``get_engine()``). The app's state holds the cache as ``app.state.sqlacache``. With
    ``close=True`` (the default) the cache is closed when the app shuts down.
    """

    def __init__(self, cache: Cache, *configs: Any, close: bool = True) -> None:
        if not isinstance(cache, Cache):
            raise ConfigurationError(
                f"SQLACachePlugin: {_shown(cache)} is not a sqlacache.Cache; "
                "pass SQLACachePlugin(Cache(...), config)"
            )
        if not configs:
            raise ConfigurationError(
                "SQLACachePlugin: name the advanced-alchemy config(s) whose sessions to cache: "
                "SQLACachePlugin(cache, alchemy_config)"
            )
        for config in configs:
            if not callable(getattr(config, "get_engine", None)):
                raise ConfigurationError(
                    f"SQLACachePlugin: {_shown(config)} is not an advanced-alchemy SQLAlchemyAsyncConfig or "
                    "SQLAlchemySyncConfig (it has no get_engine())"
                )
        self.cache = cache
        self.configs: Sequence[Any] = configs
        self.close = close

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Bind the configs' engines at start-up; close the cache at shutdown."""
        app_config.on_startup.append(self._bind)
        if self.close:
            app_config.on_shutdown.append(self._close)
        app_config.state["sqlacache"] = self.cache
        return app_config

    def _bind(self) -> None:
        for config in self.configs:
            # The config makes its engine once and keeps it: the sessions it makes use this one.
            self.cache.bind(config.get_engine())

    async def _close(self) -> None:
        await self.cache.aclose()
