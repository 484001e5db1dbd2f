"""Every ``.. code-block:: python`` in docs/*.rst runs as a test (Sybil), page by page in one
namespace, top to bottom: what the docs show is what a user gets. Set-up a reader need not see goes
in ``.. invisible-code-block: python``; a block that cannot run here (a server we do not start,
a framework's CLI) is preceded by ``.. skip: next`` and its reason."""

from __future__ import annotations

from sybil import Sybil
from sybil.parsers.rest import PythonCodeBlockParser, SkipParser

pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["*.rst"],
).pytest()
