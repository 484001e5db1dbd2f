"""A Redis ACL user that may touch only one key prefix and its fan-out channel (docs/security.rst).

``RIGHTS``: what a sqlacache process needs, and nothing else: the keys ``<prefix>*``, the channels
``<prefix>*``, and the commands of the read, write, scripting, pub/sub and connection categories
(no admin, no dangerous commands: no FLUSHALL, no KEYS, no CONFIG, no DEBUG).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import redis

# Commands by category, then the keys and channels the user may name.
COMMANDS = (
    "-@all",
    "+@read",
    "+@write",
    "+@scripting",
    "+@pubsub",
    "+@connection",
    "+@transaction",
    "+@keyspace",
    "+@string",
    "+@hash",
    "+@set",
    "+@sortedset",
    "-@dangerous",
    "-@admin",
    "+time",  # the scripts' clock (generations are microseconds); TIME is in no category above
)


def rights(prefix: str) -> list[str]:
    return ["resetkeys", f"~{prefix}*", "resetchannels", f"&{prefix}*", *COMMANDS]


def add_user(admin_url: str, name: str, prefix: str) -> str:
    """Create (or reset) ACL user ``name`` limited to ``prefix``; its URL on the same server."""
    password = secrets.token_hex(16)
    client = redis.Redis.from_url(admin_url)
    try:
        client.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rights(prefix))
    finally:
        client.close()
    host_port, _, db = admin_url.removeprefix("redis://").partition("/")
    return f"redis://{name}:{password}@{host_port}/{db or '0'}"


@contextmanager
def restricted_redis(prefix: str = "sqlacache-") -> Iterator[str]:
    """A throwaway redis-server with a user limited to ``prefix``: that user's URL."""
    from tests.faults import RedisServer

    server = RedisServer()
    server.start()
    try:
        yield add_user(server.url, "sqlacache", prefix)
    finally:
        server.close()
