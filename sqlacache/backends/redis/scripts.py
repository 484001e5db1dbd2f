"""The Redis backend's Lua scripts, read from ``lua/*.lua`` in the package: every check-and-set is one script.

``prelude.lua`` holds what every script shares; ``lookup``, ``generation``, ``store`` and ``bump``
run after it. ``check.lua`` is the store's check, run by ``store`` here and by the cluster's
``cluster_check`` (cluster.py). ``release`` stands alone.
"""

from __future__ import annotations

from importlib.resources import files


def source(name: str) -> str:
    """The text of ``lua/<name>.lua``."""
    return (files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


# As UTF-8 bytes: redis-py would encode a str with the client's own encoding (``encoding="latin-1"``
# can't encode the comments), and the SHA is of the bytes Redis receives.
PRELUDE = "\n" + source("prelude")
LOOKUP = (PRELUDE + "\n" + source("lookup")).encode()
GENERATION = (PRELUDE + "\n" + source("generation")).encode()
CHECK = "\n" + source("check")
STORE = (PRELUDE + CHECK + "\n" + source("store")).encode()
BUMP = (PRELUDE + "\n" + source("bump")).encode()
RELEASE = ("\n" + source("release")).encode()
