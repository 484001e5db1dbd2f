"""README.rst is the project's front page (PyPI renders it): valid reStructuredText, its quick start
runs as written, its test command is the one CI runs, and its links lead to pages that exist.

The rest of the documentation is in docs/, whose python blocks run as tests themselves (Sybil,
docs/conftest.py) and which tests/test_docs_build.py builds with Sphinx."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.rst"


def _python_blocks() -> list[str]:
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", README.read_text())
    return [re.sub(r"^   ", "", b, flags=re.M) for b in blocks]


def test_the_quick_start_runs_as_written(capsys) -> None:
    (block,) = _python_blocks()
    namespace: dict[str, object] = {}
    # dont_inherit: not this module's ``from __future__ import annotations`` (Mapped[...] must resolve).
    # The block has its own assert: never stale after commit.
    exec(compile(block, "README.rst", "exec", dont_inherit=True), namespace)
    cache = namespace["cache"]
    stats = cache.stats()
    # The comments' claims: the second session's get was a hit; the commit evicted it.
    assert stats["hits"] == 1 and stats["misses"] == 3 and stats["invalidations"] >= 1, stats
    assert "'hits': 1" in capsys.readouterr().out
    cache.close()
    namespace["engine"].dispose()


def test_the_test_command_is_the_one_ci_runs() -> None:
    """.ci/run extracts the first ``$ … python -m pytest …`` line of the README and runs it."""
    cmd = subprocess.run(
        ["sed", "-n", r"s/^ *\$ \(.*python -m pytest.*\)$/\1/p", str(README)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()[0]
    assert cmd == 'python -m pip install -e ".[test]" && python -m pytest -q'


def test_the_links_lead_to_pages_that_exist() -> None:
    targets = re.findall(r"<(docs/[^>]+)>`_", README.read_text())
    assert len(targets) >= 10, targets
    missing = [t for t in targets if not (ROOT / t).is_file()]
    assert not missing, missing


def test_the_readme_is_valid_restructuredtext() -> None:
    """PyPI renders README.rst as the project's page: a malformed table or title must fail here."""
    import docutils.core
    import docutils.utils

    try:
        docutils.core.publish_doctree(
            README.read_text(), settings_overrides={"report_level": 2, "halt_level": 2}
        )
    except docutils.utils.SystemMessage as exc:
        pytest.fail(f"README.rst: {exc}")
