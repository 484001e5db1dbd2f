"""Test kits shipped with sqlacache: :class:`BackendTests` proves a backend keeps the contract; the
assertions (``assert_hits``, ``assert_no_sql``…) check what an application's code did."""

from sqlacache.testing.assertions import (
    CacheAssertions,
    Counted,
    Statements,
    assert_cached,
    assert_hits,
    assert_misses,
    assert_no_sql,
    assert_num_queries,
    counting,
    recording,
)
from sqlacache.testing.backends import TTL, BackendTests, Harness, ready

__all__ = [
    "TTL",
    "BackendTests",
    "CacheAssertions",
    "Counted",
    "Harness",
    "Statements",
    "assert_cached",
    "assert_hits",
    "assert_misses",
    "assert_no_sql",
    "assert_num_queries",
    "counting",
    "ready",
    "recording",
]
