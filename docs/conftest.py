"""Every ``.. code-block:: python`` in docs/*.rst runs as a test (Sybil), page by page in one
namespace, top to bottom: what the docs show is what a user gets. Set-up a reader need not see goes
in ``.. invisible-code-block: python``; a block that cannot run here (a server we do not start,
a framework's CLI) is preceded by ``.. skip: next`` and its reason.

A page whose examples use the local Redis or PostgreSQL (or start ``redis-server`` processes) is
skipped, with the reason, where those are missing — and fails in CI, as the tests do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sybil import Sybil
from sybil.parsers.rest import PythonCodeBlockParser, SkipParser

from tests.conftest import IN_CI, PG_SYNC_URL, REDIS_URL, _reachable

pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["*.rst"],
).pytest()

# What a page's text says it needs, and whether this machine has it.
_NEEDS = {
    "SQLACACHE_TEST_REDIS_URL": ("Redis", lambda: _reachable(REDIS_URL, 6379)),
    "SQLACACHE_TEST_PG": ("PostgreSQL", lambda: _reachable(PG_SYNC_URL, 5432)),
    "tests.faults": ("the redis-server binary", lambda: shutil.which("redis-server") is not None),
    "tests.cluster": ("the redis-server binary", lambda: shutil.which("redis-server") is not None),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_CI:
        return
    missing: dict[Path, list[str]] = {}
    for item in items:
        path = Path(str(item.path))
        if path.suffix != ".rst":
            continue
        if path not in missing:
            text = path.read_text(encoding="utf-8")
            missing[path] = sorted(
                {what for mark, (what, there) in _NEEDS.items() if mark in text and not there()}
            )
        if missing[path]:
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing[path])}, not available here"))
