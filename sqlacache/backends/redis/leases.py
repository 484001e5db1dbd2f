"""Fill leases as both Redis backends (one Redis, a cluster) hand them out: a token per attempt, and
what ``lease()`` returns from its lookup's outcome (the contract's three answers)."""

from __future__ import annotations

import secrets

from sqlacache.backends.base import Lookup


def new_token() -> str:
    """A lease's (or a refresh claim's) token: only its holder can give it back."""
    return secrets.token_hex(8)


def outcome(found: Lookup, taken: bool, token: str) -> tuple[Lookup, str | bool | None]:
    """``(a hit, None)``; on a miss ``(lookup, token)`` if the lease was taken, else ``(lookup, False)``
    (another process holds it)."""
    if found.entry is not None:
        return found, None
    return found, token if taken else False
