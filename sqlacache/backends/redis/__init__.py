"""Redis backend: entries and dependency versions in Redis, every check-and-set in one Lua script.

Key layout (``P`` is the prefix)::

    P:e:<key>   an entry:  b"<generation>\\x1f<dep1>\\x1f<dep2>...\\n" + payload   (PX = entry ttl)
    P:v:<dep>   a dependency version: the decimal generation of its last bump  (PX >= its entries')
    P:gen       the generation counter (no TTL)
    P:l:<key>   a lease: the token of the process filling a missing entry  (PX = the lease's time)
    P:r:<key>   a refresh-ahead claim: one process refreshes a due entry  (PX = its time)

Generations are microseconds on the Redis clock, pushed forward by one on every bump when bumps come
faster than the clock. If ``P:gen`` is lost (eviction, ``clear``) the counter resumes from the clock,
so generations keep increasing without any state surviving; a missing version is likewise treated
as "bumped just now". Losing any key can therefore only cause misses, never a stale hit.

Requires Redis >= 6.0 (``SET ... KEEPTTL``) and a client with ``decode_responses=False`` and the default
``encoding='utf-8'``.

The scripts touch keys that are not declared in ``KEYS`` (the versions and the counter). That is
fine on a standalone server or a replicated primary; Redis Cluster would need every key of a prefix
in one hash slot (a ``{...}`` hash tag in the prefix) and the keys declared.
"""

from sqlacache.backends.redis.backend import RedisBackend

__all__ = ["RedisBackend"]
