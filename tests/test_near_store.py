"""The near-cache's store on its own (no server): bounds, evictions, and the insertion check that
keeps a read which began before an eviction from putting back what the eviction removed."""

from __future__ import annotations

import threading
import time

from sqlacache.backends import Entry
from sqlacache.near.store import NearStore


def entry(*deps: str, size: int = 10) -> Entry:
    return Entry(b"x" * size, deps)


def in_step(**kw: int) -> NearStore:
    store = NearStore(kw.get("max_entries", 100), kw.get("max_bytes", 1 << 20), 60.0)
    store.synced()
    return store


def test_nothing_is_held_or_served_out_of_step() -> None:
    store = NearStore(10, 1 << 20, 60.0)
    store.offer("k", entry("t:a"), 1, store.epoch, 60)
    assert store.get("k") is None and len(store) == 0
    store.synced()
    store.offer("k", entry("t:a"), 1, store.epoch, 60)
    assert store.get("k") is not None
    store.lost()
    assert store.get("k") is None and len(store) == 0 and not store.in_step


def test_an_eviction_removes_what_depends_on_it_and_only_that() -> None:
    store = in_step()
    store.offer("a1", entry("t:a", "r:a:1"), 1, store.epoch, 60)
    store.offer("a2", entry("t:a", "r:a:2"), 1, store.epoch, 60)
    store.offer("b", entry("t:b"), 1, store.epoch, 60)
    store.evict(frozenset({"r:a:1"}))
    assert store.get("a1") is None and store.get("a2") is not None and store.get("b") is not None
    store.evict(frozenset({"*"}))
    assert len(store) == 0 and store.size_bytes == 0


def test_a_read_that_began_before_a_concerning_eviction_is_not_taken() -> None:
    store = in_step()
    since = store.epoch  # a reader asks Redis ...
    store.evict(frozenset({"r:a:1"}))  # ... a commit evicts meanwhile ...
    store.offer("a1", entry("t:a", "r:a:1"), 1, since, 60)  # ... what it read may be older
    assert store.get("a1") is None
    store.offer("b", entry("t:b"), 1, since, 60)  # the eviction does not concern this one
    assert store.get("b") is not None
    since = store.epoch
    store.lost()
    store.synced()
    store.offer("b2", entry("t:b"), 1, since, 60)  # out of step meanwhile: anything may have changed
    assert store.get("b2") is None


def test_a_read_older_than_the_remembered_evictions_is_not_taken() -> None:
    store = in_step()
    since = store.epoch
    for i in range(600):  # more than the store remembers
        store.evict(frozenset({f"r:x:{i}"}))
    store.offer("b", entry("t:b"), 1, since, 60)
    assert store.get("b") is None
    store.offer("b", entry("t:b"), 1, store.epoch, 60)
    assert store.get("b") is not None


def test_bounds_by_entries_bytes_and_time() -> None:
    store = in_step(max_entries=3)
    for k in "abcd":
        store.offer(k, entry(f"t:{k}"), 1, store.epoch, 60)
    assert store.get("a") is None and len(store) == 3  # least recently used first
    store.get("b")
    store.offer("e", entry("t:e"), 1, store.epoch, 60)
    assert store.get("b") is not None and store.get("c") is None
    small = in_step(max_bytes=1000)
    small.offer("big", entry("t:a", size=5000), 1, small.epoch, 60)  # larger than the whole store
    assert small.get("big") is None
    for i in range(10):
        small.offer(f"k{i}", entry("t:a", size=200), 1, small.epoch, 60)
    assert small.size_bytes <= 1000 and small.get("k9") is not None
    short = in_step()
    short.offer("k", entry("t:a"), 1, short.epoch, 0.05)  # the read's own TTL bounds it
    assert short.get("k") is not None
    time.sleep(0.06)
    assert short.get("k") is None


def test_concurrent_readers_never_put_back_what_a_concurrent_eviction_removed() -> None:
    """Real threads: readers "read Redis" (the value current when they began) and offer it; a
    writer moves the value and evicts. After the writer's eviction returns, the store never
    holds an older value."""
    store = in_step()
    current = [0]
    stop = threading.Event()
    stale: list[tuple[int, int]] = []

    def reader() -> None:
        while not stop.is_set():
            since = store.epoch
            seen = current[0]  # what Redis answered
            store.offer("k", Entry(str(seen).encode(), ("r:t:1",)), 1, since, 60)

    def writer() -> None:
        for value in range(1, 2000):
            current[0] = value  # the commit's bump ...
            store.evict(frozenset({"r:t:1"}))  # ... then the committing process's eviction
            held = store.get("k")
            if held is not None and int(held.entry.payload) < value:
                stale.append((int(held.entry.payload), value))
        stop.set()

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not stale, stale[:5]
