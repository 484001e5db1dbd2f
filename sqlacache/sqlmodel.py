"""SQLModel integration: ``from sqlacache.sqlmodel import CachingSQLModelSession`` (see
``sqlacache.integrations.sqlmodel``; needs ``pip install "sqlacache[sqlmodel]"``)."""

from sqlacache.integrations.sqlmodel import CachingSQLModelAsyncSession, CachingSQLModelSession

__all__ = ["CachingSQLModelAsyncSession", "CachingSQLModelSession"]
