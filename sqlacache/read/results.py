"""ORM ``Result`` objects, hit or miss, shaped exactly as SQLAlchemy shapes them.

A miss returns SQLAlchemy's own result: its rows are produced lazily, when the caller consumes it,
so errors surface where they would (a result consumed after ``close()`` raises), ``.context`` and
``.raw`` are there, and ``unique()`` rules are the ORM's. What the cache needs is taken on the way
(``tap``). A hit builds the same kind of result from a per-shape template that holds nothing of any
session: keys, the ORM's uniquing rules, and whether a joined eager collection demands ``unique()``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import Result
from sqlalchemy.engine.result import ChunkedIteratorResult, SimpleResultMetaData

from sqlacache import _sa


def _require_unique(obj: Any) -> Any:
    # The ORM's own message (sqlalchemy.orm.loading.instances), for a result that must be uniqued.
    raise exc.InvalidRequestError(
        "The unique() method must be invoked on this Result, as it contains results that include "
        "joined eager loads against collections"
    )


@dataclass(slots=True)
class ResultTemplate:
    """How a statement shape's ORM result looks, without any rows, session or connection."""

    metadata: SimpleResultMetaData
    single_entity: bool
    attributes: Any  # the ORM's flags read by legacy Query ("filtered", "is_single_entity")
    requires_unique: bool


def template_from(result: Result[Any], requires_unique: bool) -> ResultTemplate | None:
    """The template of an ORM result just produced (None for results of another kind)."""
    md = _sa.result_metadata(result)
    if not isinstance(md, SimpleResultMetaData):
        return None
    return ResultTemplate(
        _sa.session_free_metadata(md),
        _sa.supports_scalars(result),
        _sa.result_attributes(result),
        requires_unique,
    )


def derive_template(statement: Any, dialect: Any, mode: tuple[bool, bool]) -> ResultTemplate | None:
    """The template of the result a session would return for ``statement`` in ``mode``
    (``_sa.result_mode``), derived without running it: the same as ``template_from`` would take from
    that result. None when its layout depends on what the database sends (``select *``…)."""
    layout = _sa.result_layout(statement, dialect, *mode)
    if layout is None:
        return None
    metadata, single_entity, attributes, requires_unique = layout
    return ResultTemplate(_sa.session_free_metadata(metadata), single_entity, attributes, requires_unique)


def result_from_rows(template: ResultTemplate, make: Callable[[], Sequence[Any]]) -> Result[Any]:
    """A result that behaves as the ORM's result for this shape does, of the rows (tuples) that
    ``make`` produces when the result is first consumed (as the ORM makes its objects then)."""
    single = template.single_entity
    made: list[Any] = []

    def chunks(size: int | None) -> Iterator[Any]:
        # A generator: nothing is made until the result is first consumed.
        if not made:
            rows = make()
            made.append([r[0] for r in rows] if single else list(rows))
        yield from made

    result: ChunkedIteratorResult[Any] = ChunkedIteratorResult(
        template.metadata, chunks, source_supports_scalars=single
    )
    _sa.set_result_attributes(result, template.attributes)
    if template.requires_unique:
        _sa.set_unique_filter_state(result, (set(), _require_unique))
    return result


def tap(result: ChunkedIteratorResult[Any], capture: Callable[[Iterator[Any]], Any]) -> None:
    """Have ``capture`` see the rows of ``result`` when the caller first consumes it.

    ``capture(chunks)`` pulls the first chunk itself (for an ORM result not read with yield_per,
    the only one: every object and eager load is made then) and returns it."""
    produce = result.chunks

    def chunks(size: int | None) -> Iterator[Any]:
        source = produce(size)
        return _tapped(source, capture) if size is None else source

    result.chunks = chunks
    result.iterator = itertools.chain.from_iterable(chunks(None))


def _tapped(source: Iterator[Any], capture: Callable[[Iterator[Any]], Any]) -> Iterator[Any]:
    rows = capture(source)
    if rows is not None:
        yield rows
    yield from source
