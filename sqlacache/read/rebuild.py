"""Rebuild: payload → objects attached to the session, as a database load would leave them.

An identity already in the session is returned as is (only its unloaded attributes are filled,
exactly like a database load), new ones are created persistent in the identity map, eager-loaded
relationships are set, columns the query did not load stay unloaded, and the ``load`` event fires.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, attributes
from sqlalchemy.orm.base import instance_state

from sqlacache import _sa
from sqlacache.analysis.codec import CodecError
from sqlacache.layout import MapperLayout, layout_of, mapper_for_path, remember
from sqlacache.read.capture import PAYLOAD_FORMAT
from sqlacache.read.plan import ENTITY, ShapeInfo

if TYPE_CHECKING:
    pass


class _HitContext:
    """Stands in for the QueryContext that ``load`` listeners receive on a database load."""

    __slots__ = ("session",)

    def __init__(self, session: Session) -> None:
        self.session = session


_Decoded = list[tuple[Mapper[Any], MapperLayout, dict[str, Any], Any, dict[str, Any]]]


def decode_entities(table: Any, near: Mapper[Any] | None) -> _Decoded:
    """An entry's entity table, decoded and validated without touching any session: a corrupt
    entry must leave no half-built object behind in an identity map. Raises CodecError."""
    if type(table) is not list:
        raise CodecError("entity table is not a list")
    decoded: _Decoded = []
    # Entries of one class follow each other (a list of rows): its mapper and layout are found once.
    last_path: str | None = None
    mapper: Any = None
    layout: Any = None
    for entry in table:
        if not (type(entry) is list and len(entry) == 3 and type(entry[0]) is str):
            raise CodecError("bad entity entry")
        cpath, raw, rels = entry
        if type(raw) is not dict or type(rels) is not dict:
            raise CodecError("bad entity entry")
        if cpath != last_path:
            mapper = mapper_for_path(cpath, near)
            layout = layout_of(mapper)
            last_path = cpath
        # In the layout's order (a database load's), not the entry's: another process wrote it.
        values = {}
        for k, decode, same in layout.decoders:
            if k in raw:
                v = raw[k]
                values[k] = v if type(v) is same else decode(v)  # (same None: never)
        try:
            if len(values) != len(raw):
                raise KeyError(sorted(set(raw) - set(values)))
            pk = tuple([values[k] for k in layout.pk_keys])
        except KeyError as exc:
            raise CodecError(f"entry does not fit the mapping of {cpath}: {exc}") from exc
        if rels:
            _check_relationships(layout, rels, len(table))
        decoded.append((mapper, layout, values, mapper.identity_key_from_primary_key(pk), rels))
    return decoded


def _check_relationships(layout: MapperLayout, rels: dict[str, Any], size: int) -> None:
    for key, ref in rels.items():
        prop = layout.relationships.get(key)
        if prop is None:
            raise CodecError(f"unknown relationship {key!r}")
        for r in ref if isinstance(ref, list) else [ref]:
            if r is not None and (type(r) is not int or not 0 <= r < size):
                raise CodecError("bad entity reference")
        if prop.uselist != isinstance(ref, list):
            raise CodecError(f"bad value for relationship {key!r}")


def attach(
    session: Session,
    identity_map: Any,
    decoded: _Decoded,
    generation: int,
    roots: Sequence[Any] = (),
    load_options: tuple[Any, ...] = (),
) -> list[Any]:
    """Decoded entities → objects in ``identity_map``, as a database load leaves them. (The map of
    the moment the statement ran: one that close()/expunge_all() replaced since refuses them with
    the ORM's own error, as a database result consumed then does.)"""
    objs: list[Any] = []
    new_states: list[Any] = []
    new_slots: list[int] = []  # where each new state's object is in ``objs``
    for mapper, layout, values, ikey, _ in decoded:
        obj = identity_map.get(ikey)
        if obj is not None:
            # Already in the session: like a database load, fill only what isn't loaded.
            state = instance_state(obj)
            unloaded = state.unloaded
            to_load = [k for k in values if k in unloaded]
            if to_load:
                dict_ = state.dict
                for k in to_load:
                    dict_[k] = values[k]
                _sa.commit_loaded(state, dict_, to_load)
                remember(state, {k: values[k] for k in to_load}, generation)
        else:
            obj = mapper.class_manager.new_instance()
            state = instance_state(obj)
            dict_ = state.dict
            dict_.update(values)
            state.key = ikey
            state.identity_token = None
            state.session_id = session.hash_key
            _sa.add_to_identity_map(identity_map, state, ikey)
            missing = () if layout.eager_expire.issubset(values) else layout.eager_expire.difference(values)
            if missing:
                # The query left these out (load_only/defer): load them on access, like the ORM does.
                _sa.expire_attributes(state, dict_, missing)
            new_states.append(state)
            new_slots.append(len(objs))
            remember(state, values, generation)
        objs.append(obj)

    related = any(d[4] for d in decoded)
    if related:
        fresh = set(new_slots)
        for slot, (obj, (_, layout, _, _, rels)) in enumerate(zip(objs, decoded)):
            if not rels:
                continue
            dict_ = instance_state(obj).dict
            for key, ref in rels.items():
                if slot not in fresh and key in dict_:
                    continue
                prop = layout.relationships[key]
                if prop.uselist:
                    value: Any = [None if r is None else objs[r] for r in ref]
                    if prop.collection_class is set:
                        value = set(value)
                else:
                    value = None if ref is None else objs[ref]
                attributes.set_committed_value(obj, key, value)

    # What a load leaves on new states for their lazy loads: the query's propagating options, and
    # where in the query each object was loaded (their paths line up with those options).
    if new_states:
        paths = _load_paths(decoded, roots) if related else {}
        for state, slot in zip(new_states, new_slots):
            state.load_options = load_options
            state.load_path = paths.get(slot) or _sa.mapper_path(decoded[slot][0])

    # New states hold only committed values (nothing to _commit_all); fire what a load fires.
    context = _HitContext(session)
    dispatch_persistent = session.dispatch.loaded_as_persistent
    for state in new_states:
        state.manager.dispatch.load(state, context)
        if dispatch_persistent:
            dispatch_persistent(session, state)
    return objs


def _load_paths(decoded: Sequence[Any], roots: Sequence[Any]) -> dict[int, Any]:
    """Each object's path in the query: roots at their mapper, related objects under the
    relationship they were reached through (the shallowest path wins, as in the ORM)."""
    paths: dict[int, Any] = {}
    todo = [(r, _sa.mapper_path(decoded[r][0])) for r in roots if type(r) is int and 0 <= r < len(decoded)]
    while todo:
        nxt: list[tuple[Any, Any]] = []
        for slot, path in todo:
            if slot in paths:
                continue
            paths[slot] = path
            layout, rels = decoded[slot][1], decoded[slot][4]
            for key, ref in rels.items():
                prop = layout.relationships[key]
                child = path[prop][prop.entity]
                nxt.extend((r, child) for r in (ref if isinstance(ref, list) else [ref]) if r is not None)
        todo = nxt
    return paths


def propagating(state: ORMExecuteState) -> tuple[Any, ...]:
    """The statement's options that a database load would leave on its objects (state.load_options)."""
    return tuple(
        o for o in _sa.statement_options(state.statement) if getattr(o, "propagate_to_loaders", False)
    )


def load_payload(payload: bytes) -> tuple[Any, list[Any]]:
    """(entity table, rows) of an entry's payload; raises CodecError on anything else."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise CodecError("payload is not JSON") from exc
    if not (
        isinstance(doc, list) and len(doc) == 3 and doc[0] == PAYLOAD_FORMAT and isinstance(doc[2], list)
    ):
        raise CodecError("payload format not recognised")
    return doc[1], doc[2]


def resolver(objs: list[Any]) -> Any:
    def resolve(ref: Any) -> Any:
        if ref is None:
            return None
        if type(ref) is not int or not 0 <= ref < len(objs):
            raise CodecError("bad entity reference")
        return objs[ref]

    return resolve


def decode_result(
    session: Session,
    payload: bytes,
    info: ShapeInfo,
    generation: int,
    load_options: tuple[Any, ...] = (),
    memo: dict[Any, Any] | None = None,
) -> Callable[[], list[Any]]:
    """Rows (tuples) of objects and values in the shape of ``info``, made when called: the payload
    is decoded and validated now (raises CodecError), the objects are attached to the session when
    the result is consumed, as a database result makes them.

    A payload stored by a single-entity result holds one reference per row, one stored with
    ``tuples()`` a list: either serves both. ``memo``: where a near-cache entry keeps its decoded
    form (reused while every value in it is immutable: the objects made from it share them)."""
    kept = memo.get("result") if memo is not None else None
    if kept is not None and kept[0] is info:
        decoded, plans, roots = kept[1:]
    else:
        decoded, plans, roots = _decode_rows(payload, info)
        if memo is not None and immutable(decoded, plans):
            memo["result"] = (info, decoded, plans, roots)
    columns = info.columns or []
    identity_map = session.identity_map
    entity_at = [i for i, c in enumerate(columns) if c is ENTITY]

    def make() -> list[Any]:
        objs = attach(session, identity_map, decoded, generation, roots, load_options)
        out = []
        for plan in plans:
            cells = list(plan)
            for i in entity_at:
                if cells[i] is not None:
                    cells[i] = objs[cells[i]]
            out.append(tuple(cells))
        return out

    return make


def _decode_rows(payload: bytes, info: ShapeInfo) -> tuple[_Decoded, list[tuple[Any, ...]], list[int]]:
    table, rows = load_payload(payload)
    decoded = decode_entities(table, info.shape.mappers[0] if info.shape.mappers else None)
    columns = info.columns or []
    refs = range(len(decoded))
    plans: list[tuple[Any, ...]] = []  # per row: entity slots (or None) and decoded values
    roots: list[int] = []
    for row in rows:
        if not isinstance(row, list):  # one reference per row: stored by a single-entity result
            if len(columns) != 1 or columns[0] is not ENTITY:
                raise CodecError("row does not fit the result shape")
            row = [row]
        elif len(row) != len(columns):
            raise CodecError("row does not fit the result shape")
        plan: list[Any] = []
        for v, c in zip(row, columns):
            if c is ENTITY:
                if v is not None and (type(v) is not int or v not in refs):
                    raise CodecError("bad entity reference")
                plan.append(v)
                if v is not None:
                    roots.append(v)
            else:
                plan.append(c.decode(v))
        plans.append(tuple(plan))
    return decoded, plans, roots


# Values objects built from a memoised decoding may share: nothing they could mutate in place.
_IMMUTABLE = frozenset(
    {
        int,
        float,
        str,
        bytes,
        bool,
        type(None),
        decimal.Decimal,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        uuid.UUID,
    }
)


def immutable(decoded: _Decoded, plans: Sequence[tuple[Any, ...]]) -> bool:
    """Whether every value of a decoding is immutable (objects made from it may share them)."""

    def frozen(v: Any) -> bool:
        return type(v) in _IMMUTABLE or isinstance(v, enum.Enum)

    return all(frozen(v) for entity in decoded for v in entity[2].values()) and all(
        frozen(v) for plan in plans for v in plan
    )
