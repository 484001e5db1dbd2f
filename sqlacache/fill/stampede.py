"""What a reader that missed does before it queries: let one reader per key fill it.

In this process the first reader to miss a key leads (``flight``); the others wait for it and look
the key up again. Across processes the leader takes a short lease in the backend; a leader that
finds the lease taken polls for the other process' entry until ``fill_timeout``, then reads the
database itself. Nobody waits longer than ``fill_timeout``, and a lease whose holder died expires
after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from sqlacache._sa import await_, in_greenlet
from sqlacache.backends import Lookup
from sqlacache.fill.flight import Flight, Flights
from sqlacache.resilience.resilient import Resilient
from sqlacache.resilience.stats import Counters


class Owner(Protocol):
    """What filling needs of the cache it fills (``Cache`` is one; fill/ stands below it)."""

    io: Resilient
    count: Counters
    flights: Flights
    fill_timeout: float
    refresh_pool: ThreadPoolExecutor | None


@dataclass(slots=True)
class Fill:
    """A leader's right to fill ``key``: land it with :func:`end` once the store is submitted."""

    key: str
    flight: Flight | None
    lease: str | None = None


def _sleep(seconds: float) -> None:
    if in_greenlet():
        await_(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


def lookup(cache: Owner, key: str, hint: Sequence[str], since: float) -> tuple[Lookup | None, Fill | None]:
    """The one backend round trip before the database: the lookup and, for a reader that is to fill
    the key, its ``Fill`` (with a backend that has leases, the lease is taken by the same call
    that looked the key up). A reader that serves a hit ``end``s the ``Fill`` it may have got.

    ``since``: when this read began. Waits, as :func:`begin`, when another reader fills the key."""
    io = cache.io
    if cache.fill_timeout <= 0 or not io.leases:
        found = io.lookup(key, hint)
        if found is not None and found.entry is not None:
            return found, None
        return _waited(cache, found, *begin(cache, key, hint, since))
    found, held = io.lease(key, cache.fill_timeout, hint)
    if found is not None and found.entry is not None:
        return found, None
    if held is False:  # another reader, here or elsewhere, fills it: wait for its entry
        return _waited(cache, found, *begin(cache, key, hint, since))
    token = held if isinstance(held, str) else None
    flight, leading, _ = cache.flights.join(key, since)
    if leading:
        return found, Fill(key, flight, token)
    # Another reader here leads this key's flight (it found the lease taken a moment ago, maybe by
    # us): the lease goes to it, and we wait for it as the other readers here do.
    end(cache, Fill(key, None, token))
    return _waited(cache, found, *begin(cache, key, hint, since))


def _waited(
    cache: Owner, found: Lookup | None, again: Lookup | None, fill: Fill | None
) -> tuple[Lookup | None, Fill | None]:
    """What :func:`begin` left: the newest lookup, and the ``Fill`` of a reader that leads — even
    with a hit, which a process that has never run the statement's shape can't rebuild yet (it
    queries, and the readers waiting for it wait for that); a reader that serves it ``end``s it."""
    return (again if again is not None else found), fill


async def alookup(cache: Owner, key: str, hint: Sequence[str]) -> tuple[Lookup | None, Fill | None, bool]:
    """:func:`lookup` awaited on the event loop, without waiting for other readers (that needs the
    greenlet): (lookup, fill, whether the miss is settled — else :func:`begin` is still to run)."""
    io = cache.io
    if cache.fill_timeout <= 0 or not io.leases:
        return await io.alookup(key, hint), None, False
    found, held = await io.alease(key, cache.fill_timeout, hint)
    if found is None or found.entry is not None:
        return found, None, True
    if held is False:
        return found, None, False
    # No flight in this process (it belongs to a task in a greenlet): readers here wait on the lease.
    return found, Fill(key, None, held if isinstance(held, str) else None), True


def begin(cache: Owner, key: str, hint: Sequence[str], since: float) -> tuple[Lookup | None, Fill | None]:
    """After a miss: wait for another reader's fill, or get the right to fill (``Fill``).

    ``since``: when the lookup that missed began. Returns the newest lookup made meanwhile (a hit
    to serve, or the miss to read at; None if none was made) and the ``Fill`` to ``end`` once
    served or stored — None for a reader that waited in vain and queries without coordination."""
    timeout = cache.fill_timeout
    if timeout <= 0:
        return None, None
    deadline = time.monotonic() + timeout
    latest: Lookup | None = None
    while True:
        flight, leading, landed = cache.flights.join(key, since)
        if leading:
            if landed and not cache.io.leases:  # a fill landed since our lookup: look again
                # (with leases, taking the lease below looks again in the same round trip)
                latest = cache.io.lookup(key, hint)
                if latest is None or latest.entry is not None:
                    return latest, Fill(key, flight)
            break
        cache.count("coalesced")
        if not flight.wait(max(0.0, deadline - time.monotonic())):
            return latest, None
        since = time.monotonic()
        latest = cache.io.lookup(key, hint)
        if latest is None or latest.entry is not None or time.monotonic() >= deadline:
            return latest, None
        # The leader stored nothing (its store was refused, or failed): one of us leads next.
    fill = Fill(key, flight)
    if not cache.io.leases:
        return latest, fill
    # Across processes: take the lease (looking the key up again in the same step: a fill may
    # have landed since), or wait for its holder's entry; if the holder stores nothing, take over.
    latest, held = cache.io.lease(key, timeout, hint)
    if held is False:
        cache.count("lease_waits")
    delay = 0.002
    while held is False:
        if time.monotonic() >= deadline:
            cache.count("lease_timeouts")
            return latest, fill
        _sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.05)
        latest, held = cache.io.lease(key, timeout, hint)
    # A hit (still leading: if this process can't rebuild it yet — a shape it has never run — the
    # caller queries, and the readers waiting here wait for that), or the lease (a token, or None
    # when the backend can't say: go ahead).
    fill.lease = held if isinstance(held, str) else None
    return latest, fill


def end(cache: Owner, fill: Fill | None) -> None:
    """Let the waiting readers look again; give the lease back unless a store took it over."""
    if fill is None:
        return
    if fill.lease is not None:
        cache.io.release(fill.key, fill.lease)
    if fill.flight is not None:
        cache.flights.land(fill.key, fill.flight)
