"""The Redis a command talks to: one client with short timeouts, and failures turned into exit codes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import redis

# Exit codes: what a script or a probe can branch on.
OK = 0
PROBLEMS = 1  # the command ran and found something wrong (doctor's advice, a key that isn't there)
USAGE = 2  # argparse's own code for a wrong command line
UNREACHABLE = 3  # Redis could not be reached, or answered with an error

DEFAULT_URL = "redis://127.0.0.1:6379/0"
URL_ENV = "SQLACACHE_URL"


class Failed(Exception):
    """A command can't go on: the message for stderr, and the exit code."""

    def __init__(self, message: str, code: int = UNREACHABLE) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Target:
    url: str
    prefix: str
    client: Any  # redis.Redis

    def call(self, *command: Any) -> Any:
        try:
            return self.client.execute_command(*command)
        except redis.exceptions.ResponseError:
            raise
        except redis.exceptions.RedisError as exc:
            raise Failed(f"Redis at {shown(self.url)} did not answer {command[0]}: {exc}") from None


def shown(url: str) -> str:
    """The URL without its password (commands print it)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}{sep}{user + ':***' if user else '***'}@{host}"


def check_prefix(prefix: str) -> str:
    if not prefix or any(c in prefix for c in "\n\x1f*?[] "):
        raise Failed(f"--prefix {prefix!r}: give the Cache's prefix (no spaces or glob characters)", USAGE)
    return prefix


def connect(url: str | None, prefix: str, timeout: float) -> Target:
    url = url or os.environ.get(URL_ENV) or DEFAULT_URL
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise Failed(
            f"--url {shown(url)!r}: give a Redis URL, e.g. redis://127.0.0.1:6379/0 (or set {URL_ENV})",
            USAGE,
        )
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        client.ping()
    except (redis.exceptions.RedisError, ValueError) as exc:
        raise Failed(f"cannot reach Redis at {shown(url)}: {exc}") from None
    return Target(url, check_prefix(prefix), client)
