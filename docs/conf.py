"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build/html`` (warnings fail the build)."""

from __future__ import annotations

project = "sqlacache"
author = "sqlacache contributors"
copyright = "sqlacache contributors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.intersphinx"]
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "sqlalchemy": ("https://docs.sqlalchemy.org/en/20/", None),
}
exclude_patterns = ["_build", "conftest.py"]
autodoc_member_order = "bysource"
html_theme = "alabaster"
