"""SQLModel: caching sessions that keep ``session.exec(...)``.

``CachingSQLModelSession`` is SQLModel's ``Session`` with :class:`~sqlacache.CachingSession`'s caching;
``CachingSQLModelAsyncSession`` is SQLModel's ``AsyncSession`` with
:class:`~sqlacache.CachingAsyncSession`'s, its sync side a ``CachingSQLModelSession``. Needs the
``sqlmodel`` extra (``pip install "sqlacache[sqlmodel]"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    from sqlmodel import Session as _SQLModelSession
    from sqlmodel.ext.asyncio.session import AsyncSession as _SQLModelAsyncSession
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError('sqlacache.sqlmodel needs SQLModel: pip install "sqlacache[sqlmodel]"') from exc

from sqlacache.session import CachingAsyncSession, CachingSession

__all__ = ["CachingSQLModelAsyncSession", "CachingSQLModelSession"]


class CachingSQLModelSession(CachingSession, _SQLModelSession):
    """SQLModel's ``Session`` whose reads are cached: ``exec``, ``get``, relationship loads.

    ``cache=`` as for :class:`~sqlacache.CachingSession` (default: the one from ``configure()``)::

        with CachingSQLModelSession(engine, cache=cache) as session:
            heroes = session.exec(select(Hero).where(Hero.age > 30)).all()
    """

    if not TYPE_CHECKING:  # type checkers keep SQLModel's own overloads of exec()

        def exec(self, statement: Any, **kw: Any) -> Any:
            # SQLModel's exec() runs Session.execute directly, past CachingSession.execute: the
            # reads deferred by an earlier execute() must still run first, in the transaction
            # state they saw.
            self._run_deferred()
            return super().exec(statement, **kw)


class CachingSQLModelAsyncSession(CachingAsyncSession, _SQLModelAsyncSession):  # type: ignore[misc]
    """SQLModel's ``AsyncSession`` whose reads are cached (``await session.exec(...)``, ``get``…).

    Use it with ``async_sessionmaker(engine, class_=CachingSQLModelAsyncSession, cache=cache)``; its
    ``sync_session_class`` is :class:`CachingSQLModelSession`.
    """

    sync_session_class = CachingSQLModelSession
