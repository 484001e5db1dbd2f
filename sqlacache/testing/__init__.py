"""Test kits shipped with sqlacache: :class:`BackendTests` proves a backend keeps the contract."""

from sqlacache.testing.backends import TTL, BackendTests, Harness, ready

__all__ = ["TTL", "BackendTests", "Harness", "ready"]
