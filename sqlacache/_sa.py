"""The only module that touches SQLAlchemy's private API; on a SQLAlchemy upgrade, check this file.

Every other module of sqlacache goes through the functions
here, and ``tests/test_sa_seam.py`` holds them to it: it fails on a private SQLAlchemy name used
anywhere else, and on a name below that the installed SQLAlchemy no longer has. Each function says
which private it wraps, and how the 2.0 and 2.1 lines differ where they do. The names:

=================================  ===================================================================
SQLAlchemy object                  private names
=================================  ===================================================================
ORMExecuteState                    ``_remaining_events``, ``_starting_event_idx``,
                                   ``_update_execution_options``
Session                            ``_execute_internal`` (``_parent_execute_state=``),
                                   ``_autobegin_t``, ``_autoflush``, ``_transaction``, ``_flushing``,
                                   ``_new``, ``_deleted``; ``binds`` (2.1) / ``_Session__binds`` (2.0)
IdentityMap                        ``_modified``, ``_add_unpresent``
InstanceState                      ``_commit``, ``_expire_attributes``; ``_sa_instance_state``
                                   (the attribute instrumented objects carry)
Mapper                             ``_path_registry``, ``_prop_set``
ORM load options                   ``_populate_existing``, ``_refresh_state``, ``_yield_per``,
(``ORMExecuteState.load_options``) ``_identity_token``, ``_autoflush``, ``_only_return_tuples``,
                                   ``_legacy_uniquing``, ``_sa_top_level_orm_context``;
                                   the ``_sa_orm_load_options`` execution option
Result                             ``_metadata``, ``_source_supports_scalars``, ``_attributes``,
                                   ``_unique_filter_state``, ``_yield_per``
SimpleResultMetaData               ``_keys``, ``_keymap``, ``_ambiguous_keys``;
                                   ``_create_unique_filters`` (2.1) / ``_unique_filters`` (2.0)
CursorResultMetaData               ``_for_freeze``
ORM compile state                  ``_ORMCompileState`` (2.1) / ``ORMCompileState`` (2.0);
(``compiled.compile_state``)       ``_entities`` (each one's ``_label_name``, ``_extra_entities``,
                                   ``_non_hashable_value``, ``_null_column_type``),
                                   ``_has_mapper_entities``, ``compile_options._is_star``
SQLCompiler                        ``_result_columns``, ``_ordered_columns``,
                                   ``_textual_ordered_columns``, ``_ad_hoc_textual``,
                                   ``_loose_column_name_matching``
statements                         ``_generate_cache_key``, ``_with_options``, ``_raw_columns``,
                                   ``_for_update_arg``, ``_values``, ``_multi_values``, ``_deannotate``
types                              ``_variant_mapping``, ``_has_bind_expression``, ``_type_affinity``,
                                   ``Enum._valid_lookup``, SQLite's ``_storage_format``
Connection, AsyncEngine            ``_is_autocommit_isolation``, ``_retrieve_proxy_for_target``
sqlalchemy.orm.strategies          ``_LoadDeferredColumns`` (2.1) / ``LoadDeferredColumns`` (2.0)
sqlalchemy.sql.sqltypes            ``_AbstractInterval``, ``_Binary`` (type bases)
sqlalchemy.util.concurrency        ``await_`` (2.1) / ``await_only`` (2.0), ``in_greenlet``,
                                   ``greenlet_spawn`` (not documented API either)
=================================  ===================================================================

The functions are plain wrappers, kept as cheap as the attribute access they replace: the read
path calls several per read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, Result
from sqlalchemy.engine.cursor import CursorResultMetaData
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, SessionTransaction, strategies
from sqlalchemy.orm import context as orm_context
from sqlalchemy.sql import sqltypes
from sqlalchemy.sql.base import Executable, ExecutableOption
from sqlalchemy.sql.selectable import Select
from sqlalchemy.types import Enum, TypeEngine
from sqlalchemy.util import concurrency, immutabledict

# -- the greenlet bridge (sqlalchemy.util.concurrency) ---------------------------------------------

#: Wait for an awaitable from inside an AsyncSession's sync core. SQLAlchemy 2.1 renamed
#: ``await_only`` to ``await_`` (the old name goes away in 2.2).
await_: Callable[[Awaitable[Any]], Any] = getattr(concurrency, "await_", None) or concurrency.await_only

#: Run a sync function in a greenlet that may ``await_`` (``sqlalchemy.util.concurrency.greenlet_spawn``).
greenlet_spawn = concurrency.greenlet_spawn


def in_greenlet() -> bool:
    """True inside an AsyncSession's sync core, where ``await_`` may be called
    (``concurrency.in_greenlet``)."""
    try:
        return bool(concurrency.in_greenlet())
    except (ImportError, ValueError):  # greenlet not installed: nothing can be running in one
        return False


# -- ORMExecuteState (the do_orm_execute hook) -----------------------------------------------------


def remaining_events(state: ORMExecuteState) -> Sequence[Any]:
    """The do_orm_execute hooks registered after the running one (``state._remaining_events()``)."""
    return state._remaining_events()


def mark_event_run(state: ORMExecuteState) -> None:
    """Have the session skip the next hook, run already (``state._starting_event_idx += 1``)."""
    state._starting_event_idx += 1


def hook_execution_options(state: ORMExecuteState) -> Mapping[str, Any]:
    """What hooks set with ``state.update_execution_options()`` (``state._update_execution_options``)."""
    return state._update_execution_options


def execute_as_hook(state: ORMExecuteState, execution_options: Mapping[str, Any]) -> Any:
    """Run the state's statement as ``invoke_statement()`` does, without its ``_sa_skip_events``
    bind argument (``Session._execute_internal(..., _parent_execute_state=state)``)."""
    return state.session._execute_internal(
        state.statement,
        state.parameters,
        execution_options=execution_options,
        bind_arguments=dict(state.bind_arguments),
        _parent_execute_state=state,
    )


# -- ORM load options (state.load_options) ---------------------------------------------------------


def must_reach_database(load_options: Any) -> bool:
    """True for a populate_existing, refresh, yield_per or identity_token load (the load options'
    ``_populate_existing``, ``_refresh_state``, ``_yield_per``, ``_identity_token``)."""
    return bool(
        load_options._populate_existing
        or load_options._refresh_state is not None
        or load_options._yield_per
        or load_options._identity_token is not None
    )


def load_autoflush(load_options: Any) -> Any:
    """Whether the load autoflushes (``load_options._autoflush``)."""
    return load_options._autoflush


def result_mode(load_options: Any) -> tuple[bool, bool]:
    """(``Query.tuples()``/only_return_tuples, legacy Query uniquing): the load options'
    ``_only_return_tuples`` and ``_legacy_uniquing``."""
    return bool(load_options._only_return_tuples), bool(load_options._legacy_uniquing)


def top_level_context(load_options: Any) -> Any:
    """The enclosing query's context, for a relationship load run for it, else None
    (``load_options._sa_top_level_orm_context``)."""
    return load_options._sa_top_level_orm_context


#: The execution option the ORM passes its load options in to the loads it runs itself (lazy loads…).
ORM_LOAD_OPTIONS = "_sa_orm_load_options"


# -- Session ---------------------------------------------------------------------------------------


def autobegin(session: Session) -> None:
    """Begin the session's transaction as a database read would (``Session._autobegin_t()``)."""
    session._autobegin_t()


def autoflush(session: Session) -> None:
    """The flush the ORM does before a read, when the session autoflushes (``Session._autoflush()``)."""
    session._autoflush()


def has_pending_changes(session: Session) -> bool:
    """Objects added, deleted or modified since the last flush (``Session._new``, ``_deleted``,
    ``identity_map._modified``)."""
    return bool(session._new or session._deleted or session.identity_map._modified)


def current_transaction(session: Session) -> SessionTransaction | None:
    """The innermost transaction (``Session._transaction``; ``get_transaction()`` is the root)."""
    return session._transaction


def is_flushing(session: Session) -> bool:
    """True during the session's flush (``Session._flushing``)."""
    return session._flushing


def session_binds(session: Session) -> Any:
    """The session's ``binds=``, or None: SQLAlchemy 2.1 keeps them as ``binds``, 2.0 as the private
    ``__binds`` (``_Session__binds``)."""
    return session.__dict__.get("binds") or session.__dict__.get("_Session__binds")


# -- identity map, instance states, mappers --------------------------------------------------------


def add_to_identity_map(identity_map: Any, state: Any, key: Any) -> None:
    """Put a new state into the identity map as a load does (``IdentityMap._add_unpresent``)."""
    identity_map._add_unpresent(state, key)


def commit_loaded(state: Any, dict_: dict[str, Any], keys: Iterable[str]) -> None:
    """Mark attributes just loaded as committed (``InstanceState._commit``)."""
    state._commit(dict_, keys)


def expire_attributes(state: Any, dict_: dict[str, Any], keys: Iterable[str]) -> None:
    """Leave these attributes to be loaded on access (``InstanceState._expire_attributes``)."""
    state._expire_attributes(dict_, keys)


def has_instance_state(obj: Any) -> bool:
    """True for an instance of a mapped class (its ``_sa_instance_state`` attribute)."""
    return hasattr(obj, "_sa_instance_state")


def mapper_path(mapper: Mapper[Any]) -> Any:
    """The root of the mapper's load paths (``Mapper._path_registry``)."""
    return mapper._path_registry


def load_order(mapper: Mapper[Any]) -> dict[str, int]:
    """Attribute key → its place in the order a database load sets attributes: the loader
    (``loading._instance_processor``) walks ``Mapper._prop_set``, a frozenset, in its iteration
    order — fixed within a process, not between processes. Both lines."""
    return {prop.key: i for i, prop in enumerate(mapper._prop_set)}


#: The ORM's loader of deferred columns: ``_LoadDeferredColumns`` in 2.1, ``LoadDeferredColumns`` in
#: 2.0 (``sqlalchemy.orm.strategies``).
DEFERRED_COLUMN_LOADERS: tuple[type, ...] = tuple(
    c for c in (getattr(strategies, n, None) for n in ("LoadDeferredColumns", "_LoadDeferredColumns")) if c
)


#: Base classes of the interval and binary types: ``sqltypes._AbstractInterval`` and
#: ``sqltypes._Binary`` (both lines), where present; the value codec dispatches on them.
INTERVAL_BASES: tuple[type, ...] = tuple(
    t for t in (getattr(sqltypes, "_AbstractInterval", None),) if isinstance(t, type)
)
BINARY_BASES: tuple[type, ...] = tuple(
    t for t in (getattr(sqltypes, "_Binary", None),) if isinstance(t, type)
)


# -- Result ----------------------------------------------------------------------------------------


def result_metadata(result: Result[Any]) -> Any:
    """The result's metadata (``Result._metadata``)."""
    return result._metadata


def supports_scalars(result: Any) -> bool:
    """Whether the result's rows are single entities (``Result._source_supports_scalars``)."""
    return bool(result._source_supports_scalars)


def result_attributes(result: Result[Any]) -> Any:
    """The ORM's flags read by legacy Query: "filtered", "is_single_entity" (``Result._attributes``)."""
    return result._attributes


def set_result_attributes(result: Result[Any], attributes: Any) -> None:
    """Set ``Result._attributes``."""
    result._attributes = attributes


def unique_filter_state(result: Any) -> Any:
    """The result's uniquing, None until ``unique()`` (``Result._unique_filter_state``)."""
    return result._unique_filter_state


def set_unique_filter_state(result: Result[Any], state: Any) -> None:
    """Set ``Result._unique_filter_state`` (a (seen set, key function) pair)."""
    result._unique_filter_state = state


class _NotYieldingPer:
    """Stands in for a result when asking the ORM's metadata for its uniquing functions (which read
    ``result._yield_per``)."""

    _yield_per = None


def session_free_metadata(md: SimpleResultMetaData) -> SimpleResultMetaData:
    """A copy of an ORM result's metadata holding nothing of its query context (nor so its session):
    the keys (``_keys``, ``_keymap``, ``_ambiguous_keys``) and the ORM's uniquing functions.

    SQLAlchemy 2.1 keeps those as ``_create_unique_filters``, a closure over the query context: it is
    called once, now; 2.0 as ``_unique_filters``, the list itself."""
    uniquing: dict[str, Any] = {}
    create = getattr(md, "_create_unique_filters", None)
    if create is not None:
        filters = tuple(create(_NotYieldingPer()))
        uniquing["_create_unique_filters"] = lambda _result: filters
    elif getattr(md, "_unique_filters", None) is not None:
        uniquing["_unique_filters"] = getattr(md, "_unique_filters")  # noqa: B009
    keys = list(md._keys)
    return SimpleResultMetaData(
        keys, extra=[md._keymap[k][2] for k in keys], _ambiguous_keys=md._ambiguous_keys, **uniquing
    )


#: The compile state of the statements whose ORM results ``sqlalchemy.orm.loading.instances`` makes
#: (selects and ``from_statement()`` of ORM entities): ``_ORMCompileState`` in 2.1, ``ORMCompileState``
#: in 2.0 (``sqlalchemy.orm.context``). Compound selects and Core statements have others.
_ORM_RESULT_STATE: Any = next(
    c for c in (getattr(orm_context, n, None) for n in ("_ORMCompileState", "ORMCompileState")) if c
)

#: Whether ``SimpleResultMetaData`` takes the ORM's uniquing as ``_create_unique_filters`` (2.1) or as
#: ``_unique_filters`` (2.0).
_CREATES_UNIQUE_FILTERS = "_create_unique_filters" in SimpleResultMetaData.__slots__


def _not_hashable(datatype: Any, *, legacy: bool = False, uncertain: bool = False) -> Callable[[Any], Any]:
    """The uniquing function of a column of values that may not be hashable: the closure of that name
    in ``loading.instances`` (the same on 2.0 and 2.1), its error message word for word."""
    if not legacy:

        def go(obj: Any) -> Any:
            if uncertain:
                try:
                    return hash(obj)
                except Exception:
                    pass
            raise sa_exc.InvalidRequestError(
                "Can't apply uniqueness to row tuple containing value of "
                f"""type {datatype!r}; {
                    "the values returned appear to be" if uncertain else "this datatype produces"
                } non-hashable values"""
            )

        return go
    if not uncertain:
        return id
    use_id = False

    def go_legacy(obj: Any) -> Any:
        nonlocal use_id
        if not use_id:
            try:
                return hash(obj)
            except Exception:
                pass
            use_id = True
        return id(obj)

    return go_legacy


def result_layout(
    statement: Any, dialect: Any, only_tuples: bool, legacy_uniquing: bool
) -> tuple[SimpleResultMetaData, bool, Any, bool] | None:
    """How the result of ``statement`` executed in a session would look, found without running it:
    (its metadata, whether its rows are single entities, its ``_attributes``, whether it must be
    uniqued), for a result the ORM makes in the mode of the load options' ``_only_return_tuples``
    and ``_legacy_uniquing``, else for the frozen copy of a Core result. None where that depends
    on what the database sends (textual columns, ``select("*")``); the caller rules out the
    ``driver_column_names`` execution option (2.1), which keys a Core result by the driver's names.

    The statement is compiled for ``dialect`` as its execution compiles it; a select of ORM entities
    or ORM columns (``compiled.compile_state`` an ``_ORMCompileState`` without
    ``compile_options._is_star``) gets its result from ``sqlalchemy.orm.loading.instances``: see
    ``_orm_result_layout``; any other statement (Core, compound selects) a ``CursorResult``: see
    ``_core_result_layout``."""
    compiled = statement.compile(dialect=dialect)
    compile_state: Any = compiled.compile_state
    if isinstance(compile_state, _ORM_RESULT_STATE):
        if compile_state.compile_options._is_star:
            return None
        return _orm_result_layout(statement, compile_state, only_tuples, legacy_uniquing)
    return _core_result_layout(compiled)


def _orm_result_layout(
    statement: Any, compile_state: Any, only_tuples: bool, legacy_uniquing: bool
) -> tuple[SimpleResultMetaData, bool, Any, bool]:
    """Read as ``loading.instances()`` reads it, from the compile state: its ``_entities`` (each one's
    ``_label_name``, ``_extra_entities``, ``supports_single_entity``, ``use_id_for_hash``,
    ``_non_hashable_value``, ``_null_column_type``, ``translate_raw_column``), the statement's
    ``_raw_columns``, and the compile state's ``_has_mapper_entities`` and
    ``multi_row_eager_loaders``. The same on 2.0 and 2.1, but for how the metadata takes its
    uniquing functions."""
    entities = compile_state._entities
    single = not only_tuples and len(entities) == 1 and bool(entities[0].supports_single_entity)
    filters = [
        (
            _not_hashable(ent.column.type, legacy=legacy_uniquing, uncertain=ent._null_column_type)
            if not ent.use_id_for_hash and (ent._non_hashable_value or ent._null_column_type)
            else id
            if ent.use_id_for_hash
            else None
        )
        for ent in entities
    ]
    labels = [ent._label_name for ent in entities]
    # A column entity also answers to the statement's own column object (``translate_raw_column``:
    # the compiled form may be a cached one of an equal statement, as ``row_processor()`` has it).
    raw = statement._raw_columns
    extra = [
        (*ent._extra_entities, raw[ent.raw_column_index])
        if getattr(ent, "translate_raw_column", False)
        else ent._extra_entities
        for ent in entities
    ]
    uniquing: dict[str, Any] = (
        {"_create_unique_filters": lambda _result: filters}
        if _CREATES_UNIQUE_FILTERS
        else {"_unique_filters": filters}
    )
    metadata = SimpleResultMetaData(labels, extra, **uniquing)
    attributes = immutabledict[str, Any]().union(
        {"filtered": compile_state._has_mapper_entities, "is_single_entity": single}
    )
    return metadata, single, attributes, bool(compile_state.multi_row_eager_loaders)


class _CompiledColumns:
    """Stands in for the ``CursorResult`` (and its execution context) a ``CursorResultMetaData`` is
    made for: what the context takes from the compiled statement, its ``result_column_struct``
    (``_result_columns``, ``_ordered_columns``, ``_textual_ordered_columns``, ``_ad_hoc_textual``,
    ``_loose_column_name_matching``), and no result processors (which the frozen metadata drops)."""

    __slots__ = ("context", "result_column_struct")

    def __init__(self, compiled: Any) -> None:
        self.context = self
        self.result_column_struct = (
            compiled._result_columns,
            compiled._ordered_columns,
            compiled._textual_ordered_columns,
            compiled._ad_hoc_textual,
            compiled._loose_column_name_matching,
        )

    def get_result_processor(self, type_: Any, colname: str, coltype: Any) -> None:
        return None


def _core_result_layout(compiled: Any) -> tuple[SimpleResultMetaData, bool, Any, bool] | None:
    """The metadata SQLAlchemy makes for the cursor of a compiled statement whose columns it matches
    to the cursor's by position (every non-textual select: a ``CursorResultMetaData`` that never
    reads the names the database sends), frozen (``_for_freeze()``) as the cache's copy of such a
    result is. None for a statement whose columns are matched by name."""
    columns, ordered = compiled._result_columns, compiled._ordered_columns
    textual_ordered = compiled._textual_ordered_columns
    if not columns or not ordered or textual_ordered:
        return None
    description = [(entry[0], None) for entry in columns]  # the same number of columns, as they come
    metadata = CursorResultMetaData(_CompiledColumns(compiled), description)  # type: ignore[arg-type]
    return metadata._for_freeze(), False, immutabledict[str, Any](), False  # type: ignore[return-value]


# -- statements ------------------------------------------------------------------------------------


def cache_key(statement: Any) -> Any:
    """The statement's cache key, or None when it can't be cached (``_generate_cache_key()``)."""
    return statement._generate_cache_key()


def statement_options(statement: Executable) -> Sequence[ExecutableOption]:
    """The options given to the statement (``Executable._with_options``)."""
    return statement._with_options


def statement_options_if_any(statement: Any) -> Any:
    """``statement_options``, or () for a statement without options (``_with_options``)."""
    return getattr(statement, "_with_options", ())


def raw_columns(select: Select[Any]) -> Sequence[Any]:
    """The columns and entities of a SELECT as written (``Select._raw_columns``)."""
    return select._raw_columns


def text_bindparams(clause: Any) -> Mapping[str, Any]:
    """The ``:name`` bind parameters a ``text()`` parsed from its string (``TextClause._bindparams``)."""
    found: Mapping[str, Any] = clause._bindparams
    return found


def for_update_arg(select: Select[Any]) -> Any:
    """The SELECT's FOR UPDATE clause, or None (``Select._for_update_arg``)."""
    return select._for_update_arg


def dml_values(statement: Any) -> Any:
    """An INSERT's or UPDATE's ``values()`` (``ValuesBase._values``)."""
    return statement._values


def multi_values(statement: Any) -> Any:
    """An INSERT's multi-row ``values([...])`` (``ValuesBase._multi_values``)."""
    return statement._multi_values


def deannotate(element: Any) -> Any:
    """The element without the ORM's annotations (``_deannotate()``), or itself if it has none."""
    return element._deannotate() if hasattr(element, "_deannotate") else element


# -- types -----------------------------------------------------------------------------------------


def variant_mapping(type_: TypeEngine[Any]) -> Mapping[str, TypeEngine[Any]]:
    """The type's ``with_variant()`` types by dialect name (``TypeEngine._variant_mapping``)."""
    return type_._variant_mapping


def has_bind_expression(type_: TypeEngine[Any]) -> bool:
    """Whether the type wraps bound values in SQL (``TypeEngine._has_bind_expression``)."""
    return type_._has_bind_expression


def type_affinity(type_: TypeEngine[Any]) -> Any:
    """The generic type the type compares as (``TypeEngine._type_affinity``)."""
    return type_._type_affinity


def enum_lookup(enum_type: Enum) -> Mapping[Any, str | None]:
    """What an ``Enum`` sends for each member or string it accepts (``Enum._valid_lookup``)."""
    return enum_type._valid_lookup


def custom_sqlite_format(type_: Any) -> bool:
    """Whether a SQLite date/time type was given its own storage_format (or truncate_microseconds):
    its ``_storage_format`` differs from its class's."""
    custom: bool = getattr(type_, "_storage_format", None) != getattr(type(type_), "_storage_format", None)
    return custom


# -- engines and connections -----------------------------------------------------------------------


def autocommit_isolation(conn: Any) -> bool:
    """Whether the connection runs with isolation_level="AUTOCOMMIT", on itself or its engine
    (``Connection._is_autocommit_isolation()``; False where there is no such method)."""
    is_autocommit = getattr(conn, "_is_autocommit_isolation", None)
    return is_autocommit is not None and bool(is_autocommit())


def async_engine(engine: Engine) -> AsyncEngine:
    """The AsyncEngine whose sync engine this is (``AsyncEngine._retrieve_proxy_for_target``)."""
    return AsyncEngine._retrieve_proxy_for_target(engine)
