"""The Redis backend's Lua scripts, read from ``lua/*.lua`` in the package: every check-and-set is one script.

``prelude.lua`` holds what every script shares; ``lookup``, ``generation``, ``store`` and ``bump``
run after it. ``release`` stands alone.
"""

from __future__ import annotations

from importlib.resources import files


def source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return (files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


PRELUDE = "\n" + source("prelude")
LOOKUP = PRELUDE + "\n" + source("lookup")
GENERATION = PRELUDE + "\n" + source("generation")
STORE = PRELUDE + "\n" + source("store")
BUMP = PRELUDE + "\n" + source("bump")
RELEASE = "\n" + source("release")
