"""Storage backends: the :class:`Backend` contract and its in-process and Redis implementations."""

from sqlacache.backends.base import Backend, BackendError, Entry, Lookup
from sqlacache.backends.memory import MemoryBackend
from sqlacache.backends.redis import RedisBackend

__all__ = ["Backend", "BackendError", "Entry", "Lookup", "MemoryBackend", "RedisBackend"]
