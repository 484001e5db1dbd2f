"""The near-cache on the read path: answer from process memory when coherence allows, else look
the key up in the backend and offer what it serves to the near-cache.

``near_coherence="strict"``: a transaction serves from memory only once the fan-out subscriber has
applied every bump up to the position read from the backend at the transaction's first read from
memory (one small round trip per transaction): nothing older than a commit that finished before
that read. ``"fanout"``: no round trip; another process's commit is seen once its message is
applied here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from sqlacache import _sa
from sqlacache.backends import Lookup
from sqlacache.context import SessionContext
from sqlacache.fill import stampede
from sqlacache.fill.stampede import Fill
from sqlacache.near.store import NearEntry, NearStore

if TYPE_CHECKING:
    from sqlacache.cache import Cache


@dataclass(slots=True)
class Source:
    """Where a lookup's entry came from: memory (``since`` None) or the backend, read from epoch
    ``since`` on (then the entry, once served, is offered to the near-cache)."""

    cache: Cache
    near: NearStore
    key: str
    since: int | None
    memo: dict[Any, Any] | None = None  # the held entry's decoded forms (from memory only)

    def served(self, lookup: Lookup, ttl: float) -> None:
        """The entry was served: count a hit from memory, or offer the backend's entry."""
        if self.since is None:
            self.cache.count("near_hits")
        elif lookup.entry is not None:
            self.near.offer(self.key, lookup.entry, lookup.generation, self.since, ttl)

    def corrupt(self) -> None:
        """The entry could not be decoded: memory must not keep (or go on serving) that key."""
        self.near.discard(self.key)


def _held(cache: Cache, near: NearStore, key: str) -> NearEntry | None:
    held = near.get(key)
    if held is None or cache.io.pending:  # nothing is served while an eviction waits
        return None
    return held


# Strict: the entry served is the one the near-cache holds *after* the subscriber was seen caught up
# with ``position`` — never one taken before that check. The subscriber applies a bump (evicting)
# before it moves its position, so an entry still there after ``caught_up(position)`` survived every
# bump up to ``position``; one taken before may have been evicted by the very bump that made
# ``caught_up`` true (another process's commit that returned before this transaction's first read).
# The look before the check only decides whether the position round trip is worth making.


def _strict_ok(ctx: SessionContext, position: Any) -> bool:
    near = ctx.cache.near
    subscription = near.subscription if near is not None else None
    return position is not None and subscription is not None and subscription.caught_up(position)


def _position(session: Session, ctx: SessionContext) -> tuple[Any, Any]:
    """(root transaction, the position it reads from memory at, or None when not read yet)."""
    tx = session.get_transaction()
    if tx is None and session.autobegin:
        # A statement's hook runs before the ORM begins the transaction its read would begin: begin
        # it now, so that the position holds for the transaction and is read once in it.
        _sa.autobegin(session)
        tx = session.get_transaction()
    at = ctx.near_at
    if tx is not None and at is not None and at[0] is tx:
        return tx, at[1]
    return tx, None


def _follow(near: NearStore, key: str, hint: Sequence[str]) -> None:
    """A subscription that follows bumps on first sight (a Redis Cluster's groups) starts following
    what the entry will depend on now, so that the next read's entry can be taken."""
    subscription = near.subscription
    if subscription is not None:
        subscription.covers(key, hint)


def lookup(
    session: Session, ctx: SessionContext, key: str, hint: Sequence[str], since: float
) -> tuple[Lookup | None, Fill | None, Source | None]:
    """:func:`stampede.lookup` with the near-cache in front."""
    cache = ctx.cache
    near = cache.near
    if near is None:
        found, fill = stampede.lookup(cache, key, hint, since)
        return found, fill, None
    held = _held(cache, near, key)
    if held is not None:
        if cache.near_coherence == "fanout":
            return Lookup(held.entry, held.generation), None, Source(cache, near, key, None, held.memo)
        tx, position = _position(session, ctx)
        if position is None:
            position = cache.io.position()
            ctx.near_at = (tx, position) if position is not None and tx is not None else None
        # Taken again once caught up: the entry found before the position was read may have been
        # evicted by a bump the subscriber applied since (up to that very position).
        if _strict_ok(ctx, position) and (held := _held(cache, near, key)) is not None:
            return Lookup(held.entry, held.generation), None, Source(cache, near, key, None, held.memo)
    _follow(near, key, hint)
    epoch = near.epoch
    found, fill = stampede.lookup(cache, key, hint, since)
    return found, fill, Source(cache, near, key, epoch)


async def alookup(
    session: Session, ctx: SessionContext, key: str, hint: Sequence[str]
) -> tuple[Lookup | None, Fill | None, bool, Source | None]:
    """:func:`stampede.alookup` with the near-cache in front (``session``: the sync session)."""
    cache = ctx.cache
    near = cache.near
    if near is None:
        return (*await stampede.alookup(cache, key, hint), None)
    held = _held(cache, near, key)
    if held is not None:
        if cache.near_coherence == "fanout":
            return Lookup(held.entry, held.generation), None, True, Source(cache, near, key, None, held.memo)
        tx, position = _position(session, ctx)
        if position is None:
            position = await cache.io.aposition()
            ctx.near_at = (tx, position) if position is not None and tx is not None else None
        if _strict_ok(ctx, position) and (held := _held(cache, near, key)) is not None:
            return Lookup(held.entry, held.generation), None, True, Source(cache, near, key, None, held.memo)
    _follow(near, key, hint)
    epoch = near.epoch
    return (*await stampede.alookup(cache, key, hint), Source(cache, near, key, epoch))
