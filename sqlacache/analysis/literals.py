"""Pure analysis: whether a ``text()`` fragment is nothing but a plain SQL literal.

``text("1")`` inside a SELECT (advanced-alchemy's ``count()``/``exists()`` select ``count(text("1"))``)
reads nothing and names nothing: the statement depends on exactly what it would depend on without
it, and its cache key holds the text. Any other ``text()`` may read tables we cannot see or call a
non-deterministic function, so it keeps the statement uncached. Conservative on purpose: one
unsigned integer or decimal, or one single-quoted string without backslashes (MySQL reads them as
escapes) or colons (``text()`` would take ``:name`` for a bind parameter) — nothing else.
"""

from __future__ import annotations

import re

from sqlalchemy.sql.elements import TextClause

from sqlacache import _sa

_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_STRING = r"'(?:[^'\\:\x00]|'')*'"
_LITERAL = re.compile(rf"\s*(?:{_NUMBER}|{_STRING})\s*")


def plain_literal(clause: TextClause) -> bool:
    """True when ``clause`` is a lone numeric or string literal without bind parameters."""
    return not _sa.text_bindparams(clause) and _LITERAL.fullmatch(clause.text) is not None
