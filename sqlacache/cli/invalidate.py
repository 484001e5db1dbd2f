"""``invalidate``: evict what a table's readers cached, or everything under the prefix.

It goes through a :class:`~sqlacache.Cache` on the same Redis and prefix, as a commit would: the
bump reaches every process's near-cache through the fan-out. A bump that can't be delivered is a
failure here (exit 3), not something kept for later: this process is about to exit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlacache.cache import Cache
from sqlacache.cli.server import OK, UNREACHABLE, USAGE, Failed, shown
from sqlacache.policy import ConfigurationError


def run_invalidate(url: str, prefix: str, tables: Sequence[str], everything: bool, timeout: float) -> int:
    """Any URL a ``Cache`` takes: a Redis Cluster or a sentinel-managed service too."""
    # The library's own warnings (a socket_timeout longer than a request should wait, a failed
    # call) speak to an application; here the exit code and its message say what happened.
    logging.getLogger("sqlacache").setLevel(logging.CRITICAL)
    try:
        cache = Cache(backend=url, prefix=prefix, socket_timeout=timeout)
    except ConfigurationError as exc:
        raise Failed(f"--url {shown(url)!r}: {exc}", USAGE) from None
    try:
        if everything:
            cache.invalidate_all()
        else:
            cache.invalidate(tables=[t.lower() for t in tables])
        delivered = cache.retry_pending()
    finally:
        cache.close()
    if not delivered:
        raise Failed(f"the invalidation could not be delivered to Redis at {shown(url)}", UNREACHABLE)
    what = "everything" if everything else "the reads of " + ", ".join(tables)
    print(f"evicted {what} under prefix {prefix!r}")
    return OK
