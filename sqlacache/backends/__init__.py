"""Storage backends: the :class:`Backend` contract and its in-process and Redis implementations."""

from sqlacache.backends.base import (
    Backend,
    BackendError,
    BackendUnavailable,
    Entry,
    FansOut,
    Leases,
    Lookup,
    LoopBound,
    NativeAsyncio,
    SendsStores,
)
from sqlacache.backends.memory import MemoryBackend
from sqlacache.backends.redis import RedisBackend

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "Entry",
    "FansOut",
    "Leases",
    "Lookup",
    "LoopBound",
    "MemoryBackend",
    "NativeAsyncio",
    "RedisBackend",
    "SendsStores",
]
