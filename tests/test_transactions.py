"""Transactions: a session sees its own writes; uncommitted or rolled-back data never reaches the cache."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from tests.helpers import cached, seed
from tests.models import User

# Freshness: also in the near-cache worlds (conftest.py).
pytestmark = [pytest.mark.near_worlds, pytest.mark.cluster_worlds]


def names(s):
    return [u.name for u in s.scalars(select(User).order_by(User.id))]


def test_session_sees_its_own_flushed_and_pending_writes(world):
    seed(world)
    cached(world, names)
    cached(world, lambda s: s.get(User, 5))
    with world.Session() as s:
        s.add(User(id=5, name="mine"))  # pending: autoflush must run before any cached answer
        assert names(s)[-1] == "mine"
        assert s.get(User, 5).name == "mine"
        s.rollback()
    with world.Session() as s:
        assert names(s) == ["u1", "u2", "u3"]
        assert s.get(User, 5) is None


def test_uncommitted_rows_never_reach_the_cache(world):
    seed(world)
    with world.Session() as writer:
        writer.get(User, 1, execution_options={"cache": False}).name = "uncommitted"
        writer.flush()
        # Reads in the writing transaction go to the database and are not stored.
        for _ in range(3):
            assert names(writer)[0] == "uncommitted"
            assert writer.scalars(select(User).where(User.id == 1)).one().name == "uncommitted"
        # Another session (a committed view) still reads the old value, cached or not.
        with world.Session() as other:
            assert names(other)[0] == "u1"
        writer.rollback()
    db, hit = cached(world, names)
    assert hit == db and hit[0] == "u1"


def test_rollback_discards_recorded_invalidations(world):
    seed(world)
    cached(world, lambda s: s.get(User, 2).name)
    with world.Session() as s:
        s.get(User, 2).name = "never"
        s.flush()
        s.rollback()
    before = world.statements()
    with world.Session() as s:
        assert s.get(User, 2).name == "u2"
    assert world.statements() == before  # nothing was committed, nothing was evicted


def test_savepoint_rollback_discards_only_its_part(world):
    seed(world)
    cached(world, lambda s: s.get(User, 1).name)
    cached(world, lambda s: s.get(User, 2).name)
    with world.Session() as s:
        s.get(User, 1).name = "kept"
        with s.begin_nested() as sp:
            s.get(User, 2).name = "dropped"
            s.flush()
            sp.rollback()
        s.commit()
    before = world.statements()
    with world.Session() as s:
        assert s.get(User, 2).name == "u2"
        assert world.statements() == before  # still cached: its savepoint was rolled back
        assert s.get(User, 1).name == "kept"


def test_released_savepoint_is_published_at_outer_commit(world):
    seed(world)
    cached(world, lambda s: s.get(User, 3).name)
    with world.Session() as s:
        with s.begin_nested():
            s.get(User, 3).name = "released"
        with world.Session() as other:
            assert other.get(User, 3).name == "u3"  # not committed yet: the cached value stays
        s.commit()
    with world.Session() as s:
        assert s.get(User, 3).name == "released"


def test_eviction_is_done_when_commit_returns(world):
    seed(world)
    cached(world, names)
    with world.Session() as reader, world.Session() as writer:
        assert names(reader)[1] == "u2"
        writer.get(User, 2).name = "now"
        writer.commit()
        reader.expire_all()
        assert names(reader)[1] == "now"
