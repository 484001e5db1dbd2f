"""The backend conformance kit: the contract's tests, runnable against any backend.

sqlacache runs it against its own backends (memory, Redis sync and asyncio, fakeredis); a third
party's backend runs it the same way (see "Writing a backend" in docs/internals.rst)::

    from sqlacache.testing import BackendTests

    class TestMyBackend(BackendTests):
        def make_backend(self):
            return MyBackend()

pytest collects the ``test_*`` methods, each on a fresh backend from ``make_backend``. A backend
that only has an asyncio client sets ``in_greenlet = True``: each test then runs in an event loop,
inside SQLAlchemy's ``greenlet_spawn``, as the sync core of an ``AsyncSession`` calls it. The hooks
``evict_version``, ``entry_exists`` and ``version_count`` let a few tests see what the contract
alone can't show (what eviction does, whether an entry was really dropped); a test whose hook is
not defined is skipped, and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any, ClassVar

from sqlalchemy.util.concurrency import greenlet_spawn

try:
    import pytest
except ImportError as exc:  # an optional extra: say which
    raise ImportError('sqlacache.testing runs on pytest: pip install "sqlacache[testing]"') from exc

from sqlacache.backends.base import Backend, BackendError, Entry, Lookup

__all__ = ["TTL", "BackendTests", "Harness", "ready"]

TTL = 60.0


class Harness:
    """What a test body sees: the backend under test, and the suite's optional hooks."""

    def __init__(self, backend: Any, suite: BackendTests) -> None:
        self.backend = backend  # Any: bodies call the contract's methods and nothing else
        self.suite = suite

    def evict_version(self, dep: str) -> None:
        """What eviction (Redis maxmemory, key expiry, an LRU bound) does to one version."""
        self.suite.evict_version(self.backend, dep)

    def entry_exists(self, key: str) -> bool | None:
        return self.suite.entry_exists(self.backend, key)

    def version_count(self) -> int:
        found = self.suite.version_count(self.backend)
        if found is None:
            pytest.skip("define version_count() to run this test")
        return found


class BackendTests:
    """The contract's tests. Subclass it, define :meth:`make_backend`, and let pytest collect it."""

    in_greenlet: ClassVar[bool] = False

    def make_backend(self) -> Backend:
        """A new, empty backend for one test."""
        raise NotImplementedError("define make_backend() to return the backend under test")

    def close_backend(self, backend: Backend) -> None:
        """After each test (the test may have closed it already)."""
        with contextlib.suppress(BackendError):
            backend.close()

    async def aclose_backend(self, backend: Backend) -> None:
        """After each test, on the event loop, when ``in_greenlet``."""
        await greenlet_spawn(self.close_backend, backend)

    def evict_version(self, backend: Backend, dep: str) -> None:
        """Remove the version of ``dep`` as eviction would; tests that need it skip without it."""
        pytest.skip("define evict_version() to run this test")

    def entry_exists(self, backend: Backend, key: str) -> bool | None:
        """Whether an entry is still stored (valid or not); None: the backend can't tell."""
        return None

    def version_count(self, backend: Backend) -> int | None:
        """How many dependency versions are stored; None: the backend can't tell."""
        return None

    def run(self, body: Callable[[Harness], None]) -> None:
        if self.in_greenlet:
            asyncio.run(self._arun(body))
            return
        backend = self.make_backend()
        try:
            body(Harness(backend, self))
        finally:
            self.close_backend(backend)

    async def _arun(self, body: Callable[[Harness], None]) -> None:
        backend = self.make_backend()
        try:
            await greenlet_spawn(body, Harness(backend, self))
        finally:
            await self.aclose_backend(backend)

    def test_is_a_backend(self) -> None:
        self.run(is_a_backend)

    def test_miss_returns_a_generation(self) -> None:
        self.run(miss_returns_a_generation)

    def test_round_trip_payloads_and_deps(self) -> None:
        self.run(round_trip_payloads_and_deps)

    def test_generation_on_a_hit_is_current(self) -> None:
        self.run(generation_on_a_hit_is_current)

    def test_bump_invalidates_dependents_only(self) -> None:
        self.run(bump_invalidates_dependents_only)

    def test_store_refused_when_bumped_after_generation(self) -> None:
        self.run(store_refused_when_bumped_after_generation)

    def test_store_accepted_when_bump_preceded_generation(self) -> None:
        self.run(store_accepted_when_bump_preceded_generation)

    def test_generations_strictly_increase_across_bumps(self) -> None:
        self.run(generations_strictly_increase_across_bumps)

    def test_missing_version_refuses_once_then_accepts(self) -> None:
        self.run(missing_version_refuses_once_then_accepts)

    def test_entry_whose_version_vanished_is_a_miss(self) -> None:
        self.run(entry_whose_version_vanished_is_a_miss)

    def test_fresh_backend_has_no_versions(self) -> None:
        self.run(fresh_backend_has_no_versions)

    def test_ttl_expiry(self) -> None:
        self.run(ttl_expiry)

    def test_nonpositive_ttl_stores_nothing(self) -> None:
        self.run(nonpositive_ttl_stores_nothing)

    def test_delete(self) -> None:
        self.run(delete)

    def test_clear(self) -> None:
        self.run(clear)

    def test_dependency_names_with_separators_are_rejected(self) -> None:
        self.run(dependency_names_with_separators_are_rejected)

    def test_closed_backend_raises_backend_error(self) -> None:
        self.run(closed_backend_raises_backend_error)

    def test_a_first_read_is_stored(self) -> None:
        self.run(a_first_read_is_stored)

    def test_a_lost_root_recreated_by_a_miss_still_outdates_its_entries(self) -> None:
        self.run(a_lost_root_recreated_by_a_miss_still_outdates_its_entries)

    def test_hinted_lookup_agrees_with_plain_lookup(self) -> None:
        self.run(hinted_lookup_agrees_with_plain_lookup)

    def test_rows_evict_condition_entries_by_value(self) -> None:
        self.run(rows_evict_condition_entries_by_value)

    def test_a_row_image_missing_a_scheme_column_evicts_every_condition_entry_of_its_table(self) -> None:
        self.run(a_row_image_missing_a_scheme_column_evicts_every_condition_entry_of_its_table)

    def test_a_scheme_registered_after_a_write_cannot_hide_it(self) -> None:
        self.run(a_scheme_registered_after_a_write_cannot_hide_it)

    def test_registering_a_scheme_keeps_the_others(self) -> None:
        self.run(registering_a_scheme_keeps_the_others)

    def test_a_lost_registry_is_a_miss(self) -> None:
        self.run(a_lost_registry_is_a_miss)

    def test_bumps_do_not_create_row_or_condition_versions(self) -> None:
        self.run(bumps_do_not_create_row_or_condition_versions)

    def test_loaded_values_count_only_if_their_table_was_not_written_since(self) -> None:
        self.run(loaded_values_count_only_if_their_table_was_not_written_since)


# -- the bodies, plain sync code against h.backend --------------------------------------------


def ready(h: Harness, deps: list[str]) -> int:
    """A generation at which ``deps`` all have versions (a fresh backend has none: missing = bumped).

    A refused store creates the missing ones; a bump never does."""
    h.backend.store("__ready__", b"", deps, 0, TTL)
    return int(h.backend.lookup("__ready__").generation)


def is_a_backend(h: Harness) -> None:
    assert isinstance(h.backend, Backend)


def miss_returns_a_generation(h: Harness) -> None:
    result = h.backend.lookup("nothing-here")
    assert isinstance(result, Lookup)
    assert result.entry is None
    assert isinstance(result.generation, int) and result.generation > 0
    assert h.backend.generation() >= result.generation


PAYLOADS = [
    b"",
    b"plain",
    b"line\nbreaks\n\n",
    b"\x1f\x1fseparators\x1f\n\x1f",
    b"\xff\xfe\x00 not utf-8 \xc3\x28",
    bytes(range(256)),
    b"12345\x1ft:fake\nlooks like a header",
    b"x" * 200_000,
]


def round_trip_payloads_and_deps(h: Harness) -> None:
    deps = ["*", "t:users", "r:users:0123abcd", "t:sch\u00e9ma.t\u00e4ble", "t:has space:colon"]
    g = ready(h, deps)
    for i, payload in enumerate(PAYLOADS):
        assert h.backend.store(f"k{i}", payload, deps, g, TTL) is True
    for i, payload in enumerate(PAYLOADS):
        result = h.backend.lookup(f"k{i}")
        assert result.entry == Entry(payload, tuple(deps))
        assert type(result.entry.payload) is bytes
    # No dependencies at all: valid until its TTL.
    assert h.backend.store("nodeps", b"v", [], h.backend.generation(), TTL) is True
    assert h.backend.lookup("nodeps").entry == Entry(b"v", ())


def generation_on_a_hit_is_current(h: Harness) -> None:
    g = ready(h, ["t:a"])
    assert h.backend.store("k", b"v", ["t:a"], g, TTL)
    h.backend.bump(["t:other"])
    hit = h.backend.lookup("k")
    assert hit.entry is not None
    assert hit.generation == h.backend.generation() > g


def bump_invalidates_dependents_only(h: Harness) -> None:
    g = ready(h, ["t:a", "t:b", "*"])
    assert h.backend.store("a", b"A", ["*", "t:a"], g, TTL)
    assert h.backend.store("b", b"B", ["*", "t:b"], g, TTL)
    assert h.backend.store("ab", b"AB", ["t:a", "t:b"], g, TTL)
    h.backend.bump(["t:a"])
    assert h.backend.lookup("a").entry is None
    assert h.backend.lookup("ab").entry is None
    assert h.backend.lookup("b").entry == Entry(b"B", ("*", "t:b"))
    h.backend.bump(["*"])
    assert h.backend.lookup("b").entry is None


def store_refused_when_bumped_after_generation(h: Harness) -> None:
    ready(h, ["t:a", "t:b"])
    g = h.backend.lookup("k").generation  # the reader's read begins
    h.backend.bump(["t:b"])  # a writer commits meanwhile
    assert h.backend.store("k", b"stale", ["t:a", "t:b"], g, TTL) is False
    assert h.backend.lookup("k").entry is None
    # The refusal is per dependency: an unrelated bump does not block.
    g2 = h.backend.lookup("k").generation
    h.backend.bump(["t:unrelated"])
    assert h.backend.store("k", b"fresh", ["t:a", "t:b"], g2, TTL) is True
    assert h.backend.lookup("k").entry == Entry(b"fresh", ("t:a", "t:b"))


def store_accepted_when_bump_preceded_generation(h: Harness) -> None:
    ready(h, ["t:a"])
    h.backend.bump(["t:a"])
    g = h.backend.lookup("k").generation
    assert h.backend.store("k", b"v", ["t:a"], g, TTL) is True
    g_explicit = h.backend.generation()
    assert h.backend.store("k2", b"v", ["t:a"], g_explicit, TTL) is True
    assert h.backend.lookup("k").entry is not None and h.backend.lookup("k2").entry is not None


def generations_strictly_increase_across_bumps(h: Harness) -> None:
    seen = [h.backend.generation()]
    for i in range(50):
        h.backend.bump([f"t:{i % 3}"])
        g = h.backend.lookup("k").generation if i % 2 else h.backend.generation()
        assert g > seen[-1]
        seen.append(g)
    # Without bumps the generation may stay put, but never goes back.
    assert h.backend.generation() >= seen[-1]


def missing_version_refuses_once_then_accepts(h: Harness) -> None:
    ready(h, ["t:a", "t:b"])
    h.evict_version("t:b")
    g = h.backend.lookup("k").generation
    # A lost version counts as bumped just now: newer than any generation handed out before.
    assert h.backend.store("k", b"v", ["t:a", "t:b"], g, TTL) is False
    assert h.backend.lookup("k").entry is None
    assert h.backend.store("k", b"v", ["t:a", "t:b"], g, TTL) is False
    g2 = h.backend.lookup("k").generation
    assert g2 > g
    assert h.backend.store("k", b"v", ["t:a", "t:b"], g2, TTL) is True
    assert h.backend.lookup("k").entry == Entry(b"v", ("t:a", "t:b"))


def entry_whose_version_vanished_is_a_miss(h: Harness) -> None:
    g = ready(h, ["t:a", "t:b"])
    assert h.backend.store("k", b"v", ["t:a", "t:b"], g, TTL)
    h.evict_version("t:b")
    assert h.backend.lookup("k").entry is None
    # Dropped, not just skipped.
    assert h.entry_exists("k") in (False, None)


def fresh_backend_has_no_versions(h: Harness) -> None:
    g = h.backend.lookup("k").generation
    assert h.backend.store("k", b"v", ["t:new"], g, TTL) is False
    assert h.backend.store("k", b"v", ["t:new"], h.backend.lookup("k").generation, TTL) is True


def ttl_expiry(h: Harness) -> None:
    g = ready(h, ["t:a"])
    assert h.backend.store("short", b"v", ["t:a"], g, 0.2)
    assert h.backend.store("long", b"v", ["t:a"], g, TTL)
    assert h.backend.lookup("short").entry is not None
    time.sleep(0.4)
    assert h.backend.lookup("short").entry is None
    assert h.backend.lookup("long").entry is not None


def nonpositive_ttl_stores_nothing(h: Harness) -> None:
    g = ready(h, ["t:a"])
    assert h.backend.store("k", b"v", ["t:a"], g, 0) is False
    assert h.backend.store("k", b"v", ["t:a"], g, -1.0) is False
    assert h.backend.store("k", b"v", ["t:a"], g, float("nan")) is False
    assert h.backend.lookup("k").entry is None


def delete(h: Harness) -> None:
    g = ready(h, ["t:a"])
    for key in ("a", "b", "c"):
        assert h.backend.store(key, key.encode(), ["t:a"], g, TTL)
    h.backend.delete(["a", "c", "never-stored"])
    h.backend.delete([])
    assert h.backend.lookup("a").entry is None
    assert h.backend.lookup("b").entry == Entry(b"b", ("t:a",))
    assert h.backend.lookup("c").entry is None


def clear(h: Harness) -> None:
    g = ready(h, ["t:a"])
    for i in range(30):
        assert h.backend.store(f"k{i}", b"v", ["t:a"], g, TTL)
    before = h.backend.generation()
    h.backend.clear()
    assert all(h.backend.lookup(f"k{i}").entry is None for i in range(30))
    # Versions went too (so a store is refused once), and generations did not go back.
    g2 = h.backend.lookup("k0").generation
    assert g2 >= before
    assert h.backend.store("k0", b"v", ["t:a"], g2, TTL) is False
    h.backend.clear()  # clearing an empty cache is fine


def dependency_names_with_separators_are_rejected(h: Harness) -> None:
    g = h.backend.generation()
    for bad in ("t:a\x1fb", "t:a\nb"):
        with pytest.raises(ValueError):
            h.backend.store("k", b"v", ["t:ok", bad], g, TTL)


def closed_backend_raises_backend_error(h: Harness) -> None:
    h.backend.close()
    with pytest.raises(BackendError):
        h.backend.lookup("k")
    with pytest.raises(BackendError):
        h.backend.bump(["t:a"])


def a_first_read_is_stored(h: Harness) -> None:
    """A miss's lookup with the reader's dependencies as ``hint`` makes their roots exist, so the
    store of that first read is accepted — on a fresh backend too."""
    for deps in (["*", "d:db", "r:users:1"], ["*", "d:db", "t:orders"], ["*", "s:items", "c:items:a:x"]):
        key = f"first-{deps[-1]}"
        g = h.backend.lookup(key, deps).generation
        assert h.backend.store(key, b"v", deps, g, TTL) is True, deps
        assert h.backend.lookup(key).entry == Entry(b"v", tuple(deps))
    # A write between the lookup and the store still refuses it.
    g = h.backend.lookup("late", ["t:late"]).generation
    h.backend.bump(["t:late"])
    assert h.backend.store("late", b"v", ["t:late"], g, TTL) is False


def a_lost_root_recreated_by_a_miss_still_outdates_its_entries(h: Harness) -> None:
    """A root the backend lost (evicted, or deleted by an invalidation it could not write) is
    recreated by the next miss as "bumped now": entries stored before stay outdated."""
    g = ready(h, ["t:a", "r:a:1"])
    assert h.backend.store("old", b"v", ["r:a:1", "t:a"], g, TTL)
    h.evict_version("t:a")
    h.evict_version("r:a:1")
    fresh = h.backend.lookup("new", ["r:a:1"]).generation  # recreates t:a
    assert fresh > g
    assert h.backend.lookup("old").entry is None
    assert h.backend.store("new", b"w", ["r:a:1"], fresh, TTL) is True
    assert h.backend.store("old", b"v", ["r:a:1", "t:a"], g, TTL) is False


def hinted_lookup_agrees_with_plain_lookup(h: Harness) -> None:
    """``lookup(key, hint)`` may answer from one MGET; it must answer what the script answers."""
    rnd = random.Random(7)
    deps_pool = ["t:a", "t:b", "r:a:1", "*"]
    h.backend.bump(deps_pool)
    for step in range(200):
        op = rnd.random()
        key = f"k{rnd.randrange(3)}"
        if op < 0.3:
            deps = rnd.sample(deps_pool, rnd.randrange(1, 4))
            h.backend.store(key, f"v{step}".encode(), deps, h.backend.lookup(key).generation, TTL)
        elif op < 0.5:
            h.backend.bump([rnd.choice(deps_pool)])
        else:
            hint = rnd.sample(deps_pool, rnd.randrange(0, 5))
            hinted = h.backend.lookup(key, hint)
            plain = h.backend.lookup(key)
            assert (hinted.entry is None) == (plain.entry is None), (step, key, hint)
            if hinted.entry is not None and plain.entry is not None:
                assert hinted.entry == plain.entry
            assert hinted.generation <= plain.generation


NAME_A = "c:users:name:aaaa"
COND = ["*", "s:users", NAME_A]


def rows_evict_condition_entries_by_value(h: Harness) -> None:
    g = ready(h, ["*", "t:users"])
    assert h.backend.store("k", b"v", COND, g, TTL)  # registry and condition start at the table's version
    h.backend.bump([], [("users", {"name": "bbbb", "id": "1"}, None)])
    assert h.backend.lookup("k", COND).entry is not None  # another value: still valid
    h.backend.bump([], [("orders", {"name": "aaaa"}, None)])
    assert h.backend.lookup("k", COND).entry is not None  # another table
    h.backend.bump([], [("users", {"name": "aaaa", "id": "2"}, None)])
    assert h.backend.lookup("k", COND).entry is None


def a_row_image_missing_a_scheme_column_evicts_every_condition_entry_of_its_table(h: Harness) -> None:
    g = ready(h, ["*", "t:users", "t:orders"])
    assert h.backend.store("k", b"v", COND, g, TTL)
    assert h.backend.store("o", b"v", ["*", "s:orders", "c:orders:total:1111"], g, TTL)
    h.backend.bump([], [("users", {"id": "1"}, None)])  # the name of the written row is unknown
    assert h.backend.lookup("k", COND).entry is None
    assert h.backend.lookup("o").entry is not None


def a_scheme_registered_after_a_write_cannot_hide_it(h: Harness) -> None:
    """A writer that committed before the scheme existed bumped no condition of it; a reader that
    began before that write must not store under the new scheme."""
    ready(h, ["*", "t:users"])
    g = h.backend.generation()  # the reader begins
    h.backend.bump(["t:users"], [("users", {"name": "aaaa"}, None)])  # no scheme registered yet
    assert h.backend.store("k", b"stale", COND, g, TTL) is False
    g2 = h.backend.generation()
    assert h.backend.store("k", b"fresh", COND, g2, TTL)


def registering_a_scheme_keeps_the_others(h: Harness) -> None:
    g = ready(h, ["*", "t:users"])
    assert h.backend.store("k", b"v", COND, g, TTL)
    other = ["*", "s:users", "c:users:active,name:1111,aaaa"]
    assert h.backend.store("k2", b"v", other, h.backend.generation(), TTL)
    assert h.backend.lookup("k", COND).entry is not None  # registering at an old version moves nothing
    h.backend.bump([], [("users", {"name": "aaaa", "active": "0000"}, None)])
    assert h.backend.lookup("k", COND).entry is None
    assert h.backend.lookup("k2", other).entry is not None
    h.backend.bump([], [("users", {"name": "aaaa", "active": "1111"}, None)])
    assert h.backend.lookup("k2", other).entry is None


def a_lost_registry_is_a_miss(h: Harness) -> None:
    g = ready(h, ["*", "t:users"])
    assert h.backend.store("k", b"v", COND, g, TTL)
    h.evict_version("s:users")
    assert h.backend.lookup("k", COND).entry is None
    h.backend.bump(["t:users"], [("users", {"name": "aaaa"}, None)])  # nobody knows the scheme now
    assert h.backend.store("k", b"v", COND, g, TTL) is False  # the write above is newer than g
    assert h.backend.store("k", b"v", COND, h.backend.generation(), TTL)


def bumps_do_not_create_row_or_condition_versions(h: Harness) -> None:
    """Metadata grows with what is cached, not with what is written."""
    ready(h, ["*", "t:users"])
    before = h.version_count()
    for i in range(200):
        h.backend.bump([f"r:users:{i:04x}", "t:users"], [("users", {"name": f"{i:04x}"}, None)])
    assert h.version_count() == before


def loaded_values_count_only_if_their_table_was_not_written_since(h: Harness) -> None:
    """An ORM object's unchanged columns are what it was loaded with, maybe before another commit."""
    g = ready(h, ["*", "t:users"])
    assert h.backend.store("k", b"v", COND, g, TTL)
    loaded_at = h.backend.generation()
    h.backend.bump(["t:users"], [("users", {"name": "bbbb"}, None)])  # another writer, another row
    assert h.backend.lookup("k", COND).entry is not None
    # Values loaded before that write may be stale (the row may now be named "aaaa"): not trusted.
    h.backend.bump(["t:users"], [("users", {"name": "cccc"}, loaded_at)])
    assert h.backend.lookup("k", COND).entry is None
    assert h.backend.store("k", b"v", COND, h.backend.generation(), TTL)
    h.backend.bump(["t:users"], [("users", {"name": "cccc"}, h.backend.generation())])  # current
    assert h.backend.lookup("k", COND).entry is not None
