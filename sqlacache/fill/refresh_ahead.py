"""Refresh-ahead: a hot entry near the end of its TTL is recomputed by one reader in the background.

With ``Cache(refresh_ahead=f)``, an entry served in the last ``f`` of its TTL is due. The first
reader to see it due (per process: a flight; across processes: the fill lease) starts a background
read of the same statement in a session of its own, which skips the lookup and stores a fresh
entry; meanwhile every reader, this one included, is served the entry, still valid. Expiry is not
a freshness event: an entry is evicted by commits whether or not it is due, so refreshing early
never serves anything a commit invalidated.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sqlacache import _sa
from sqlacache.fill import stampede
from sqlacache.fill.stampede import Owner

log = logging.getLogger("sqlacache.refresh")


def claim(cache: Owner, key: str, since: float) -> stampede.Fill | None:
    """The right to refresh ``key`` (whose lookup began at ``since``), unless a reader here or
    elsewhere is at it, or has just done it."""
    flight = cache.flights.try_lead(key, since)
    if flight is None:
        return None
    fill = stampede.Fill(key, flight)
    # Across processes the lease is left to expire, not released: while it lives, readers that
    # looked the old entry up before the refresh landed don't refresh it again.
    if cache.io.leases and cache.io.claim(key, max(cache.fill_timeout, 1.0)) is False:
        stampede.end(cache, fill)
        return None
    return fill


def start(cache: Owner, fill: stampede.Fill, bind: Any, run: Callable[[Session], Any]) -> None:
    """Run ``run`` in a fresh session on ``bind``, away from the reader: a thread, or a task of the
    running event loop for an async engine. ``run`` must pass ``_sqlacache_refresh=fill``."""
    if not isinstance(bind, Engine):  # bound to a Connection: its transaction is the caller's
        stampede.end(cache, fill)
        return
    cache.count("refreshes")
    if bind.dialect.is_async:  # its connections live on the running event loop
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            stampede.end(cache, fill)
            return
        cache.io.track(loop.create_task(_arun(cache, fill, bind, run)))
        return
    pool = cache.refresh_pool
    if pool is None:
        pool = cache.refresh_pool = ThreadPoolExecutor(2, thread_name_prefix="sqlacache-refresh")
    try:
        # In the reader's context (contextvars: a tenant, a request id), as a task would be.
        pool.submit(contextvars.copy_context().run, _run, cache, fill, bind, run)
    except RuntimeError:  # shutting down
        stampede.end(cache, fill)


def _run(cache: Owner, fill: stampede.Fill, engine: Engine, run: Callable[[Session], Any]) -> None:
    try:
        with Session(engine) as session:
            session.__dict__["_sqlacache_cache"] = cache
            run(session)
    except Exception as exc:  # the readers have their entry; a failed refresh is only a later miss
        _failed(cache, exc)
    finally:
        stampede.end(cache, fill)


async def _arun(cache: Owner, fill: stampede.Fill, engine: Engine, run: Callable[[Session], Any]) -> None:
    try:
        async with AsyncSession(_sa.async_engine(engine)) as session:
            session.sync_session.__dict__["_sqlacache_cache"] = cache
            await session.run_sync(run)
    except Exception as exc:
        _failed(cache, exc)
    finally:
        stampede.end(cache, fill)


def _failed(cache: Owner, exc: BaseException) -> None:
    cache.count("refresh_failures")
    cache.io.warn("refresh", "sqlacache: a refresh-ahead read failed: %s", exc, level=logging.INFO)
