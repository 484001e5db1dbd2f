"""Litestar + advanced-alchemy integration: ``from sqlacache.litestar import SQLACachePlugin`` (see
``sqlacache.integrations.litestar``; needs ``pip install "sqlacache[litestar]"``)."""

from sqlacache.integrations.litestar import SQLACachePlugin

__all__ = ["SQLACachePlugin"]
