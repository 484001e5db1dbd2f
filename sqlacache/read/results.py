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


def _require_unique(obj: Any) -> Any:
    # The ORM's own message (sqlalchemy.orm.loading.instances), for a result that must be uniqued.
    raise exc.InvalidRequestError(
        "The unique() method must be invoked on this Result, as it contains results that include "
        "joined eager loads against collections"
    )


class _NotYieldingPer:
    """Stands in for a result when asking the ORM's metadata for its uniquing functions."""

    _yield_per = None


@dataclass(slots=True)
class ResultTemplate:
    """How a statement shape's ORM result looks, without any rows, session or connection."""

    metadata: SimpleResultMetaData
    single_entity: bool
    attributes: Any  # the ORM's flags read by legacy Query ("filtered", "is_single_entity")
    requires_unique: bool


def mode_of(load_options: Any) -> tuple[bool, bool]:
    """What, besides the statement, decides a result's shape: ``Query.tuples()`` / only_return_tuples
    and legacy uniquing. One template per mode."""
    return bool(load_options._only_return_tuples), bool(load_options._legacy_uniquing)


def template_from(result: Result[Any], requires_unique: bool) -> ResultTemplate | None:
    """The template of an ORM result just produced (None for results of another kind)."""
    md = result._metadata
    if not isinstance(md, SimpleResultMetaData):
        return None
    uniquing: dict[str, Any] = {}
    create = getattr(md, "_create_unique_filters", None)
    if create is not None:
        # SQLAlchemy 2.1: a closure over the query context (and so the session): call it once, now.
        filters = tuple(create(_NotYieldingPer()))
        uniquing["_create_unique_filters"] = lambda _result: filters
    elif getattr(md, "_unique_filters", None) is not None:  # SQLAlchemy 2.0: the list itself
        uniquing["_unique_filters"] = getattr(md, "_unique_filters")  # noqa: B009
    keys = list(md._keys)
    metadata = SimpleResultMetaData(
        keys, extra=[md._keymap[k][2] for k in keys], _ambiguous_keys=md._ambiguous_keys, **uniquing
    )
    return ResultTemplate(
        metadata, bool(result._source_supports_scalars), result._attributes, requires_unique
    )


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
    result._attributes = template.attributes
    if template.requires_unique:
        result._unique_filter_state = (set(), _require_unique)
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
