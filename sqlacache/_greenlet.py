"""SQLAlchemy's greenlet bridge, as the layers below the session need it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.util import concurrency as _concurrency

# SQLAlchemy 2.1 renamed await_only to await_ (the old name goes away in 2.2).
await_: Callable[[Awaitable[Any]], Any] = getattr(_concurrency, "await_", None) or _concurrency.await_only


def in_greenlet() -> bool:
    """True inside an AsyncSession's sync core, where ``await_`` may be called."""
    try:
        return bool(_concurrency.in_greenlet())
    except (ImportError, ValueError):  # greenlet not installed: nothing can be running in one
        return False
