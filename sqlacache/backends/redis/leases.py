"""Fill leases as both Redis backends (one Redis, a cluster) hand them out: a token per attempt, and
what ``lease()`` returns from its lookup's outcome (the contract's three answers)."""

from __future__ import annotations

import itertools
import os
import secrets

from sqlacache.backends.base import Lookup

# Every lookup sends a token (a miss takes the lease in the same step), so making one must cost
# nothing: a random prefix per process and a counter. Tokens only need to be unique (nobody gives
# back a lease that isn't theirs), not secret: a writer of Redis can delete any lease anyway.
_prefix = secrets.token_hex(6)
_serial = itertools.count()


def _new_process() -> None:
    global _prefix
    _prefix = secrets.token_hex(6)  # a forked child must not hand out its parent's tokens


if hasattr(os, "register_at_fork"):  # (not on Windows, which doesn't fork)
    os.register_at_fork(after_in_child=_new_process)


def new_token() -> str:
    """A lease's (or a refresh claim's) token: only its holder can give it back."""
    return f"{_prefix}{next(_serial):x}"


def outcome(found: Lookup, taken: bool, token: str) -> tuple[Lookup, str | bool | None]:
    """``(a hit, None)``; on a miss ``(lookup, token)`` if the lease was taken, else ``(lookup, False)``
    (another process holds it)."""
    if found.entry is not None:
        return found, None
    return found, token if taken else False
