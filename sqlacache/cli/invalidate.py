"""``invalidate``: evict what a table's readers cached, or everything under the prefix.

It goes through a :class:`~sqlacache.Cache` on the same Redis and prefix, as a commit would: the
bump reaches every process's near-cache through the fan-out. A bump that can't be delivered is a
failure here (exit 3), not something kept for later: this process is about to exit.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlacache.cache import Cache
from sqlacache.cli.server import OK, UNREACHABLE, Failed, Target, shown


def run_invalidate(target: Target, tables: Sequence[str], everything: bool, timeout: float) -> int:
    cache = Cache(backend=target.url, prefix=target.prefix, socket_timeout=timeout)
    try:
        if everything:
            cache.invalidate_all()
        else:
            cache.invalidate(tables=[t.lower() for t in tables])
        delivered = cache.retry_pending()
    finally:
        cache.close()
    if not delivered:
        raise Failed(f"the invalidation could not be delivered to Redis at {shown(target.url)}", UNREACHABLE)
    what = "everything" if everything else "the reads of " + ", ".join(tables)
    print(f"evicted {what} under prefix {target.prefix!r}")
    return OK
