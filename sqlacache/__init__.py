"""sqlacache: a read-through query cache for SQLAlchemy 2.x sessions, invalidated at commit."""

from sqlacache.backends import Backend, BackendError, MemoryBackend, RedisBackend
from sqlacache.binding import CacheClosedError
from sqlacache.cache import Cache, configure, default_cache
from sqlacache.policy import ConfigurationError
from sqlacache.read.explain import Explanation
from sqlacache.session import CachingAsyncSession, CachingSession, DeferredResult
from sqlacache.write.tracker import Evictions, UnitOfWorkTracker

__all__ = [
    "Backend",
    "BackendError",
    "Cache",
    "CacheClosedError",
    "CachingAsyncSession",
    "CachingSession",
    "ConfigurationError",
    "DeferredResult",
    "Evictions",
    "Explanation",
    "MemoryBackend",
    "RedisBackend",
    "UnitOfWorkTracker",
    "configure",
    "default_cache",
]

__version__ = "0.2.0.dev0"
