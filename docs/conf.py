"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build/html`` (warnings fail the build)."""

from __future__ import annotations

import sys
from pathlib import Path

# autodoc documents the checkout these pages belong to, not whatever sqlacache is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

project = "sqlacache"
author = "sqlacache contributors"
copyright = "sqlacache contributors"
# No intersphinx: the build runs in CI with warnings as errors, and must not need the network.
extensions = ["sphinx.ext.autodoc"]
exclude_patterns = ["_build", "conftest.py"]
autodoc_member_order = "bysource"
# Signatures as written (``backend: Any = 'memory://'``), not with every annotation expanded.
autodoc_typehints = "signature"
html_theme = "alabaster"
