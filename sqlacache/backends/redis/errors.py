"""Redis and client failures as :class:`~sqlacache.backends.BackendError`, with a kind the stats count."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio
from redis.exceptions import RedisError

from sqlacache.backends.base import BackendError, BackendUnavailable

# Failures of the client or the server. RuntimeError is here because an asyncio client used from an
# event loop other than the one it connected on fails with one ("attached to a different loop").
FAILURES: tuple[type[BaseException], ...] = (
    RedisError,
    OSError,
    asyncio.TimeoutError,
    TimeoutError,
    RuntimeError,
)

# The server could not be reached or cannot serve yet (LOADING is a ConnectionError in redis-py).
UNREACHABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    asyncio.TimeoutError,
    TimeoutError,
)


KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (redis.exceptions.BusyLoadingError, "loading"),
    (redis.exceptions.TimeoutError, "timeout"),
    (asyncio.TimeoutError, "timeout"),
    (TimeoutError, "timeout"),
    (redis.exceptions.ConnectionError, "connection"),
    (OSError, "connection"),
    (redis.exceptions.OutOfMemoryError, "oom"),
    (redis.exceptions.ReadOnlyError, "readonly"),
    (redis.exceptions.NoScriptError, "noscript"),
    (redis.exceptions.ResponseError, "server"),
)


def failure(what: str, exc: BaseException) -> BackendError:
    kind = next((name for cls, name in KINDS if isinstance(exc, cls)), "error")
    if kind == "server" and "OOM" in str(exc):  # raised inside a script: a plain ResponseError
        kind = "oom"
    elif kind == "server" and "READONLY" in str(exc):
        kind = "readonly"
    error = BackendUnavailable if isinstance(exc, UNREACHABLE) else BackendError
    # str(), not repr(): redis-py's repr hides the server's own message ("server:ResponseError").
    return error(f"Redis {what} failed: {type(exc).__name__}: {exc}", kind)
