"""The backend of docs/internals.rst's "Writing a backend", run by the shipped kit exactly as written there.

The example is read from that page, so the documentation and this test cannot drift apart.
"""

from __future__ import annotations

import pathlib
import re

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "internals.rst"


def _example() -> str:
    text = PAGE.read_text(encoding="utf-8")
    section = text.split("\nWriting a backend\n-----------------\n", 1)[1]
    block = re.search(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", section)
    assert block is not None, "docs/internals.rst's 'Writing a backend' has no python example"
    return re.sub(r"^   ", "", block.group(1), flags=re.M)


exec(compile(_example(), str(PAGE), "exec"))  # defines CountingBackend and TestCountingBackend


def test_the_kit_without_pytest_names_the_extra_to_install():
    import subprocess
    import sys

    code = "import sys; sys.modules['pytest'] = None; import sqlacache.testing"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert 'pip install "sqlacache[testing]"' in proc.stderr
