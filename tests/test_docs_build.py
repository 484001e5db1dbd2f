"""The documentation builds with Sphinx, warnings as errors, as CI would publish it: a broken
cross-reference, a page missing from the toctree, or a docstring autodoc can't render fails here.

(The python blocks of the pages run as tests through Sybil: docs/conftest.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_docs_build_without_warnings(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    for page in ("index", "usage", "configuration", "operations", "migration", "faq", "changelog"):
        assert (tmp_path / f"{page}.html").is_file(), page
    # The configuration reference is generated from Cache's docstring: every parameter is there.
    html = (tmp_path / "configuration.html").read_text()
    for parameter in ("backend", "models", "default_ttl", "near_heartbeat", "breaker_max_cooldown"):
        assert f">{parameter}<" in html, parameter
