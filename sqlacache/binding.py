"""Which cache a session reads through, and whether it still may.

A plain ``Session`` reads through the cache its engine was given to with ``Cache.bind``. A session
that routes statements itself — ``binds=``, or a ``get_bind()`` override such as Flask-SQLAlchemy's
``db.session`` — is decided per statement: a read is cached when the engine it goes to is bound.
A session whose cache was closed raises instead of silently caching nothing and queueing
evictions that can never be delivered.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session

from sqlacache import _sa
from sqlacache.cache import Cache, bound_caches, bound_to


class CacheClosedError(RuntimeError):
    """A session is used after its cache was closed (``cache.close()``)."""

    def __init__(self) -> None:
        super().__init__(
            "sqlacache: this session's Cache is closed (cache.close() was called): it can no longer "
            "serve reads nor evict what a commit changes. Make sessions from a Cache that is open: "
            "close the cache at shutdown, after the sessions using it, or create a new Cache and a "
            "sessionmaker(..., cache=new_cache)"
        )


def binds_of(session: Session) -> Mapping[Any, Any]:
    """A session's ``binds=`` (SQLAlchemy 2.1 keeps them as ``binds``, 2.0 as a private attribute)."""
    found = _sa.session_binds(session)
    return found if isinstance(found, Mapping) else {}


def routes_itself(session: Session) -> bool:
    """Whether statements of this session may go to engines other than ``session.bind``."""
    return type(session).get_bind is not Session.get_bind or bool(binds_of(session))


def _default_bind(session: Session) -> Any:
    """Where a statement without an entity goes (Flask-SQLAlchemy: the app's main engine)."""
    try:
        return session.get_bind()
    except Exception:  # binds= only, or a get_bind() that needs a context: no default
        return None


def _reachable(session: Session) -> Iterator[Any]:
    yield session.bind
    if routes_itself(session):
        yield _default_bind(session)
        yield from binds_of(session).values()


def bound_cache(session: Session) -> Cache | None:
    """The cache a plain ``Session`` uses because an engine it reaches was passed to ``Cache.bind``."""
    cache: Cache | None = None
    caches = bound_caches()
    if caches:
        cache = next((c for c in map(bound_to, _reachable(session)) if c is not None), None)
        if cache is None and routes_itself(session) and len(caches) == 1:
            # It may route some statements to the one bound engine: each read is checked anyway.
            cache = next(iter(caches))
    session.__dict__["_sqlacache_cache"] = cache or False
    return cache


@event.listens_for(Session, "before_commit")
def _before_commit(session: Session) -> None:
    ctx = session.__dict__.get("_sqlacache")
    cache = ctx.cache if ctx is not None else session.__dict__.get("_sqlacache_cache")
    if cache and cache.closed:
        raise CacheClosedError()
