"""Flask-SQLAlchemy: make ``db.session`` read through a cache.

Two ways, pick one:

* ``init_app(app, db)`` (the usual one): gives every engine of ``db`` for ``app`` — the default one
  and each of ``SQLALCHEMY_BINDS`` — to the cache (``Cache.bind``). ``db.session`` stays
  Flask-SQLAlchemy's own session; each read is served from the cache, each commit evicts what it
  changed.
* ``SQLAlchemy(session_options={"class_": CachingFlaskSession, "cache": cache})``: ``db.session`` is
  a :class:`~sqlacache.CachingSession` too (``.cached()`` on results, the statement-free ``get``).

Needs the ``flask`` extra (``pip install "sqlacache[flask]"``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

try:
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy
    from flask_sqlalchemy.session import Session as _FlaskSession
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError('sqlacache.flask needs Flask-SQLAlchemy: pip install "sqlacache[flask]"') from exc

from sqlacache.cache import Cache
from sqlacache.policy import ConfigurationError
from sqlacache.session import CachingSession

__all__ = ["CachingFlaskSession", "init_app"]


class CachingFlaskSession(CachingSession, _FlaskSession):
    """Flask-SQLAlchemy's session (it picks each model's engine from ``__bind_key__``) with caching:
    ``SQLAlchemy(session_options={"class_": CachingFlaskSession, "cache": cache})``."""


_CONFIG_KEYS = frozenset({"SQLACACHE_BACKEND", "SQLACACHE_OPTIONS"})


def _cache_from_config(app: Flask) -> Cache:
    options = app.config.get("SQLACACHE_OPTIONS") or {}
    if not isinstance(options, Mapping):
        raise ConfigurationError(
            f"app.config['SQLACACHE_OPTIONS'] = {options!r}: give a dict of Cache options, "
            "e.g. {'default_ttl': 300, 'prefix': 'myapp'}"
        )
    if "backend" in options:
        raise ConfigurationError(
            "app.config['SQLACACHE_OPTIONS'] has 'backend': set app.config['SQLACACHE_BACKEND'] instead"
        )
    # Cache(**options) would raise a TypeError that doesn't say the name came from app.config.
    known = set(inspect.signature(Cache).parameters) - {"backend"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigurationError(
            f"app.config['SQLACACHE_OPTIONS'] has unknown option(s) {unknown}; the Cache options are "
            f"{sorted(known)}"
        )
    # A misspelt key (SQLACACHE_BACKEN) would otherwise leave the cache in memory, silently.
    typos = sorted(k for k in app.config if k.startswith("SQLACACHE_") and k not in _CONFIG_KEYS)
    if typos:
        raise ConfigurationError(
            f"app.config has {typos}: sqlacache reads only {sorted(_CONFIG_KEYS)} "
            "(the other Cache options go in the SQLACACHE_OPTIONS dict)"
        )
    return Cache(backend=app.config.get("SQLACACHE_BACKEND", "memory://"), **options)


def init_app(app: Flask, db: SQLAlchemy, cache: Cache | None = None) -> Cache:
    """Cache ``db.session``'s reads in ``app``; returns the cache (also ``app.extensions["sqlacache"]``).

    Call it after ``db.init_app(app)`` (or ``SQLAlchemy(app)``). Without ``cache``, one is made from
    ``app.config``: ``SQLACACHE_BACKEND`` (default ``"memory://"``; use Redis with several worker
    processes) and ``SQLACACHE_OPTIONS`` (a dict of other :class:`~sqlacache.Cache` options).
    """
    if not isinstance(app, Flask):
        raise ConfigurationError(f"init_app: {app!r} is not a Flask app; call init_app(app, db)")
    if not isinstance(db, SQLAlchemy):
        raise ConfigurationError(
            f"init_app: {db!r} is not a flask_sqlalchemy.SQLAlchemy; call init_app(app, db)"
        )
    if app.extensions.get("sqlalchemy") is not db:
        raise ConfigurationError(
            "init_app: this SQLAlchemy instance is not registered on this app: call db.init_app(app) "
            "first, then sqlacache.flask.init_app(app, db)"
        )
    if "sqlacache" in app.extensions:
        # As Flask-SQLAlchemy refuses a second db.init_app: a second cache would take the engines
        # over and leave the first one open, its connections with it.
        raise ConfigurationError(
            "init_app: sqlacache is already set up on this app (app.extensions['sqlacache']); "
            "call init_app once per app, or create a new app"
        )
    if cache is None:
        cache = _cache_from_config(app)
    elif not isinstance(cache, Cache):
        raise ConfigurationError(
            f"init_app: cache={cache!r} is not a sqlacache.Cache; pass init_app(app, db, Cache(...)), "
            "or leave it out to make one from app.config"
        )
    with app.app_context():
        for engine in db.engines.values():  # the default engine and every SQLALCHEMY_BINDS one
            cache.bind(engine)
    app.extensions["sqlacache"] = cache
    return cache
