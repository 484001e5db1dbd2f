"""The read path's orchestration: the ``do_orm_execute`` hook → policy → key → lookup → fill → ORM objects.

On a miss the statement runs as usual and what the *database* returned is stored (capture.py); on a
hit, objects are rebuilt the way the ORM builds them from rows (rebuild.py). ``Session.get`` has
its own fast path (get.py); the memos both consult are in plan.py.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import event, util
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Result
from sqlalchemy.engine.result import ChunkedIteratorResult
from sqlalchemy.orm import ORMExecuteState, Session

from sqlacache import _sa
from sqlacache.analysis import dependencies as deps_mod
from sqlacache.analysis.codec import CodecError
from sqlacache.backends import Lookup
from sqlacache.binding import CacheClosedError
from sqlacache.cache import bound_to
from sqlacache.context import Frame, SessionContext, context_of
from sqlacache.fill import refresh_ahead, stampede
from sqlacache.fill.stampede import Fill
from sqlacache.keys import Uncacheable, translation_token
from sqlacache.layout import layout_of, remember
from sqlacache.policy import check_call_options
from sqlacache.read import near
from sqlacache.read.capture import Graph, Unstorable, encode_result
from sqlacache.read.plan import (
    NO_CACHE_KEY,
    GetTicket,
    KeyPlan,
    ShapeInfo,
    StatementGet,
    deps_of_statement,
    entry_written,
    excluded_reason,
    hint_for,
    key_plans,
    learn,
    options_reason,
    policy_reason,
    shape_info,
    tables_written,
    written_reason,
)
from sqlacache.read.rebuild import decode_result, propagating
from sqlacache.read.results import ResultTemplate, derive_template, result_from_rows, tap, template_from
from sqlacache.resilience.stores import StoreJob

if TYPE_CHECKING:
    from sqlacache.cache import Cache


log = logging.getLogger("sqlacache.reads")


def _run_remaining(state: ORMExecuteState) -> Result[Any] | None:
    """Run the do_orm_execute hooks registered after ours first, so that what they change in the
    statement (tenant criteria, soft-delete filters…) is part of the key."""
    hooks: list[Any] = list(_sa.remaining_events(state))
    for fn in hooks:
        _sa.mark_event_run(state)
        result = fn(state)
        if result:
            return result  # type: ignore[no-any-return]
    return None


@event.listens_for(Session, "do_orm_execute")
def _on_execute(state: ORMExecuteState) -> Result[Any] | None:
    session = state.session
    ctx = session.__dict__.get("_sqlacache")
    if ctx is None:
        if session.__dict__.get("_sqlacache_cache") is False:
            return None
        ctx = context_of(session)
        if ctx is None:
            return None
    if ctx.cache.closed:
        raise CacheClosedError()
    if not state.is_select or not ctx.reads or not ctx.cache.enabled:
        return None
    check_call_options(state.execution_options)
    flag = state.execution_options.get("cache")
    if flag is False:
        refused(ctx.cache, "off", "the execution option cache=False turns it off")
        return None
    if ctx.routed and bound_to(session.get_bind(**state.bind_arguments)) is not ctx.cache:
        return None  # a session that routes statements itself, to an engine not bound to this cache
    ran_others = bool(_sa.remaining_events(state))
    if ran_others:
        early = _run_remaining(state)
        if early is not None:
            return early
    # A bug in sqlacache must never break a read: before the statement runs (and outside the
    # autoflush, whose errors are the application's), any failure means "go to the database".
    guard = Guard()
    try:
        result = _read(ctx, state, flag is True, guard)
    except Exception as exc:
        if guard.passthrough:
            raise
        ctx.cache.internal.error(exc, "on the read path")
        result = None
    if result is None and ran_others:
        # The later hooks have run already; don't let the session run them a second time.
        return invoke(state)
    return result


# The execution options the ORM reads into its load options (QueryContext.default_load_options
# .from_execution_options in orm_pre_session_exec).
_LOAD_OPTION_KEYS = ("populate_existing", "autoflush", "yield_per", "identity_token")


def invoke(state: ORMExecuteState) -> Result[Any]:
    """``state.invoke_statement()``, minus the private ``_sa_skip_events`` bind argument it adds:
    a ``get_bind(self, mapper=None, clause=None)`` override, as SQLAlchemy's docs write one, takes
    no such argument, and the database path (no hook re-executing) never passes it."""
    options = state.local_execution_options
    # What the ORM already turned into load options (and, for a post-load, merged in from the
    # enclosing query) must not be read again as if the caller had passed it: the enclosing query's
    # yield_per or autoflush would leak into its relationship loads. A hook's own settings stay.
    hooked = _sa.hook_execution_options(state)
    again = [k for k in _LOAD_OPTION_KEYS if k in options and k not in hooked]
    if again:
        options = util.immutabledict({k: v for k, v in options.items() if k not in again})
    result: Result[Any] = _sa.execute_as_hook(state, options)
    return result


class Guard:
    """True while the application's own work runs (autoflush, the statement): its errors are its own."""

    __slots__ = ("passthrough",)

    def __init__(self) -> None:
        self.passthrough = False

    def begin(self, session: Session) -> None:
        """Autobegin, as a database read would (an error if the session was made autobegin=False)."""
        self.passthrough = True
        _sa.autobegin(session)
        self.passthrough = False

    def autoflush(self, session: Session) -> None:
        """The flush the database path would do before reading; a failure in it is the caller's."""
        self.passthrough = True
        _sa.autoflush(session)
        self.passthrough = False


def refused(cache: Cache, code: str, why: str | Callable[[], str], model: str = "", op: str = "") -> None:
    """A read the cache doesn't serve nor store: a debug line on ``sqlacache.reads`` (whose
    ``extra`` fields are the metrics' labels) and, when a metrics sink listens, a refusal event.
    ``why`` may be a function: its sentence is only made for the log line."""
    recorder = cache.count.recorder
    if recorder is not None:
        recorder.event("refusals", model, op, code)
    if log.isEnabledFor(logging.DEBUG):
        reason = why if isinstance(why, str) else why()
        log.debug(
            "sqlacache: not cached (%s %s): %s",
            model or "-",
            op or "-",
            reason,
            extra={
                "sqlacache_event": "refusal",
                "sqlacache_model": model,
                "sqlacache_op": op,
                "sqlacache_reason": code,
                "sqlacache_detail": reason,
            },
        )


def _read(ctx: SessionContext, state: ORMExecuteState, forced: bool, guard: Guard) -> Result[Any] | None:
    cache = ctx.cache
    why = options_reason(state.execution_options)
    if why is not None:
        refused(cache, "load_option", why)
        return None
    if _sa.must_reach_database(state.load_options):
        return None  # a refresh, a lazy load of an expired attribute: the ORM's own, not a refusal
    opts = state.execution_options
    ticket: GetTicket | None = opts.get("_sqlacache_get")
    if ticket is not None:
        if ticket.used:
            ticket = None  # a nested load (selectin…) inherited the options of the get
        else:
            ticket.used = True
    op = None
    shaped: StatementGet | None = opts.get("_sqlacache_statement_get")
    if shaped is not None and not shaped.used:  # (nested loads inherit the get's options)
        shaped.used, op = True, "get"
    statement: Any = state.statement
    ck = _sa.cache_key(statement)
    if ck is None:
        refused(cache, "uncacheable", NO_CACHE_KEY)
        return None
    info = shape_info(cache, statement, ck.key)
    excluded = cache.exclusions.named_by(info.shape.digest, statement) if info.reason is None else ""
    if info.reason is not None or excluded:
        if not ctx.frames:  # a nested load's entity rows are stored in the enclosing entry anyway
            cache.count("uncacheable")
            if excluded:
                refused(cache, "excluded", excluded_reason(excluded), info.model, op or info.op)
            else:
                refused(cache, info.reason_code, info.reason or "", info.model, op or info.op)
        return None
    session = state.session
    label = "get" if ticket is not None else (op or info.op)
    if ticket is not None:
        ttl = ticket.ttl
    else:
        rule = cache.policy.rule_for(info.lead)
        if not forced and (rule is None or label not in rule.ops):
            if not ctx.frames:  # (a nested load's rows are stored in the enclosing entry anyway)
                sentence = lambda: policy_reason(cache, info, label) or ""  # noqa: E731
                refused(cache, "not_configured", sentence, info.model, label)
            return None
        ttl = opts.get("cache_ttl") or (rule.ttl if rule is not None else cache.policy.default_ttl)
    # The database path begins the session's transaction (or refuses to, autobegin=False) and
    # flushes before it reads; so must we, or a hit would hide pending writes.
    guard.begin(session)
    # A hook may have turned it off with update_execution_options(autoflush=False).
    if _sa.hook_execution_options(state).get("autoflush", _sa.load_autoflush(state.load_options)):
        guard.autoflush(session)
    statement_tables = info.table_names
    if tables_written(ctx, statement_tables):
        refused(cache, "written", lambda: written_reason(ctx, statement_tables) or "", info.model, label)
        return None
    statement_deps: list[str]
    refresh: Fill | None = opts.get("_sqlacache_refresh")
    if ticket is not None:
        key, lookup, dialect, plan = ticket.key, ticket.lookup, ticket.dialect, ticket.plan
        statement_deps = plan.deps
        hint = plan.hint or []
        began = ticket.began
    else:
        bind = session.get_bind(**state.bind_arguments)
        dialect = bind.dialect if cache.precise else None
        namespace = cache.internal.namespace(bind)
        translate = opts.get("schema_translate_map")
        if translate:
            namespace = f"{namespace}|{translation_token(translate)}"
        try:
            values = [b.effective_value for b in ck.bindparams]
        except sa_exc.InvalidRequestError:
            # A value the ORM can't resolve (a comparison to a detached or unflushed object): the
            # statement raises that to the caller itself, as without the cache; not our error.
            return None
        try:
            key = cache.keys.key(
                namespace,
                info.shape.digest,
                values,
                state.parameters if isinstance(state.parameters, Mapping) else None,
            )
        except Uncacheable as exc:
            cache.count("uncacheable")
            refused(cache, "uncacheable_value", str(exc), info.model, label)
            return None
        plan_key = (key, cache.precise, cache.condition_in_limit)
        memo = key_plans.get(plan_key)
        if memo is None:
            found = deps_of_statement(cache, info, statement, ck, state.parameters, dialect)
            memo = KeyPlan([cache.internal.database_dep(bind), *found])
            key_plans.put(plan_key, memo)
        plan = memo
        statement_deps = plan.deps
        hint = hint_for(plan, info.hint)
        began = time.monotonic()
    fill = refresh
    source: near.Source | None = None  # where the near-cache says the entry came from
    filling = False  # from the moment _fill runs, it lands the fill (when its rows are stored)
    mode = _sa.result_mode(state.load_options)
    template = info.templates.get(mode)
    try:
        if refresh is not None:
            lookup = Lookup(None, cache.io.generation() or -1)
        else:
            if ticket is None:
                lookup, fill, source = near.lookup(state.session, ctx, key, hint, began)
            else:  # Session.get looked it up (and took the fill) already: the fill is ours now
                fill, ticket.fill = ticket.fill, None
                if not ticket.coordinated:
                    ticket.coordinated = True
                    if lookup is not None and lookup.entry is None:
                        again, fill = stampede.begin(cache, key, hint, began)
                        lookup = again if again is not None else lookup
            hit = _serve(
                ctx, state, info, template, mode, key, lookup, plan if ticket is None else None, label, source
            )
            if hit is not None:
                if source is not None and lookup is not None:
                    source.served(lookup, ttl)
                if lookup is not None and lookup.refresh_due and ticket is None:
                    _refresh_statement(cache, state, key, began)
                return hit
            if (
                fill is None
                and lookup is not None
                and lookup.entry is not None
                and mode not in info.templates
            ):
                # A shape this process has never run and can't derive the result of (see _derive):
                # if another reader is filling this key, wait for it instead.
                again, fill = stampede.begin(cache, key, hint, began)
                if again is not None:
                    template = info.templates.get(mode)  # the leader we waited for may have made it
                    hit = _serve(
                        ctx, state, info, template, mode, key, again, plan if ticket is None else None, label
                    )
                    if hit is not None:
                        return hit
                    lookup = again
        if refresh is None:  # a refresh-ahead read is counted as "refreshes", not as a reader's miss
            cache.count.event("misses", info.model, label)
        filling = True
        capture = _Capture(ctx, info, key, fill, ticket, statement_deps, dialect, plan, ttl, lookup)
        capture.label = label
        return _fill(state, capture, guard)
    finally:
        if not filling:
            stampede.end(cache, fill)


def _refresh_statement(cache: Cache, state: ORMExecuteState, key: str, began: float) -> None:
    fill = refresh_ahead.claim(cache, key, began)
    if fill is None:
        return
    statement, params = state.statement, state.parameters
    options = {k: v for k, v in state.execution_options.items() if not k.startswith("_sqlacache")}
    options["_sqlacache_refresh"] = fill
    bind = state.session.get_bind(**state.bind_arguments)
    refresh_ahead.start(
        cache, fill, bind, lambda s: s.execute(statement, params, execution_options=options).all()
    )


def _serve(
    ctx: SessionContext,
    state: ORMExecuteState,
    info: ShapeInfo,
    template: ResultTemplate | None,
    mode: tuple[bool, bool],
    key: str,
    lookup: Lookup | None,
    plan: KeyPlan | None,
    label: str,
    source: near.Source | None = None,
) -> Result[Any] | None:
    """The cached result, when the lookup found one this session may use."""
    entry = lookup.entry if lookup is not None else None
    if entry is None or lookup is None:
        return None
    if plan is not None:
        learn(plan, entry.deps, info.hint)
    if entry_written(ctx, entry.deps):
        return None
    if template is None:
        template = _derive(state, info, mode)
        if template is None:
            return None
    try:
        memo = source.memo if source is not None else None
        make = decode_result(state.session, entry.payload, info, lookup.generation, propagating(state), memo)
    except Exception as exc:  # corrupt, foreign or outdated: a miss, never an error
        if source is not None:
            source.corrupt()
        ctx.cache.io.drop(key, "corrupt", exc)
        return None
    count = ctx.cache.count
    count("hits")
    if count.recorder is not None:  # a metrics sink listens
        count.recorder.event("hits", info.model, label)
    if ctx.frames:
        ctx.frames[-1].deps.update(entry.deps)
    if state.execution_options.get("prebuffer_rows"):
        # AsyncSession has the ORM make its objects inside the call (in the greenlet); so do we.
        rows = make()
        make = lambda: rows  # noqa: E731
    return result_from_rows(template, make)


_deriving = threading.Lock()


def _derive(state: ORMExecuteState, info: ShapeInfo, mode: tuple[bool, bool]) -> ResultTemplate | None:
    """The template of a shape this process has not run yet, derived from its statement (compiled,
    not run: see ``derive_template``) so that it can serve what another process stored. None for a
    shape whose result layout depends on what the database sends: its first read here runs it."""
    if not info.derivable:
        return None
    bind = state.session.get_bind(**state.bind_arguments)
    if state.execution_options.get("driver_column_names") or bind.get_execution_options().get(
        "driver_column_names"
    ):
        return None  # (SQLAlchemy 2.1) a result keyed by the names the driver sends
    with _deriving:  # once per shape and mode, however many readers of it arrive at once
        template = info.templates.get(mode)
        if template is not None or not info.derivable:
            return template
        try:
            template = derive_template(state.statement, bind.dialect, mode)
        except Exception as exc:  # whatever it is, the database path answers (and learns the template)
            log.debug("sqlacache: cannot derive the result layout of %s: %r", info.shape.digest, exc)
        if template is None:
            info.derivable = False
            return None
        return info.templates.setdefault(mode, template)


def _fill(state: ORMExecuteState, capture: _Capture, guard: Guard) -> Result[Any]:
    """A miss: run the statement and return SQLAlchemy's own result; its rows are stored when the
    caller consumes it (see ``_Capture``)."""
    ctx, frame = capture.ctx, capture.frame
    top = capture.top = _sa.top_level_context(state.load_options)
    if top is not None:  # (the ORM registers the eager loads beneath it when the statement runs)
        capture.later_before = set(getattr(top, "post_load_paths", ()))
    ctx.frames.append(frame)
    guard.passthrough = True  # from here on the statement runs: its errors reach the caller
    try:
        result = invoke(state)
    except BaseException:
        capture.end()
        raise
    finally:
        _pop(ctx, frame)
    mode = _sa.result_mode(state.load_options)
    if isinstance(result, ChunkedIteratorResult):
        capture.watch(result, mode)
    if isinstance(result, ChunkedIteratorResult) and not state.execution_options.get("prebuffer_rows"):
        # The ORM makes objects (and runs eager loads) when the result is first consumed.
        tap(result, capture.pull)
        weakref.finalize(result, capture.end)  # never consumed: let waiting readers go
        result.__dict__["_sqlacache_capture"] = capture  # for .cached(ttl=…) before first use
        return result
    if isinstance(result, ChunkedIteratorResult):
        # Rows already made (AsyncSession buffers them inside the call): take them now.
        capture.pull(result.chunks(None))
        return result
    # A Core result (column selects), or one of another hook's making: take its rows now.
    frozen = result.freeze()
    copy = frozen()
    capture.watch(copy, mode)
    capture.pull(iter([list(frozen.data)]))
    return frozen()


def set_ttl(result: Any, ttl: float) -> None:
    """The TTL a miss's rows are stored with, if they are not stored yet (``.cached(ttl=…)``)."""
    capture = getattr(result, "__dict__", {}).get("_sqlacache_capture")
    if capture is not None and not capture.done:
        capture.ttl = ttl


def _pop(ctx: SessionContext, frame: Frame) -> None:
    if ctx.frames and ctx.frames[-1] is frame:
        ctx.frames.pop()
    elif frame in ctx.frames:
        ctx.frames.remove(frame)


class _Capture:
    """A miss's rows on their way to the caller: encoded and handed to the backend once, when the
    ORM makes them (the first consumption of the result), then the fill is landed."""

    def __init__(
        self,
        ctx: SessionContext,
        info: ShapeInfo,
        key: str,
        fill: Fill | None,
        ticket: GetTicket | None,
        statement_deps: list[str],
        dialect: Any,
        plan: KeyPlan,
        ttl: float,
        lookup: Lookup | None,
    ) -> None:
        self.ctx, self.info, self.key, self.fill, self.ticket = ctx, info, key, fill, ticket
        generation = (
            ctx.tx_generation if ctx.tx_generation is not None else (lookup.generation if lookup else None)
        )
        frame = Frame(generation if generation is not None and generation >= 0 else None)
        self.statement_deps, self.dialect, self.plan, self.ttl, self.frame = (
            statement_deps,
            dialect,
            plan,
            ttl,
            frame,
        )
        self.mode: tuple[bool, bool] = (False, False)
        self.single = False
        self.result: weakref.ref[Any] | None = None  # for the shape's template, until first consumed
        self.requires_unique = False
        self.top: Any = None  # the enclosing query's context, for a relationship load run for it
        self.standalone = True  # whether its rows make an entry on their own
        self.later_before: set[Any] | None = None
        self.done = False
        self.label = "get" if ticket is not None else info.op  # the op, for metrics and logs

    def watch(self, result: Any, mode: tuple[bool, bool]) -> None:
        self.mode, self.single = mode, _sa.supports_scalars(result)
        if mode not in self.info.templates:
            self.result = weakref.ref(result)
            # Read now: the caller's .unique() replaces it.
            self.requires_unique = _sa.unique_filter_state(result) is not None

    def end(self) -> None:
        if not self.done:
            self.done = True
            stampede.end(self.ctx.cache, self.fill)

    def pull(self, source: Any) -> Any:
        """Take the first chunk from ``source`` with this read's frame current; store it."""
        if self.done:
            return next(source, None)
        frame = self.frame
        # A relationship load run for an enclosing query registers the eager loads beneath it with
        # that query (when its statement runs), which runs them after this read: their results
        # can't be in this read's entry, and a hit couldn't schedule them. Such a read is not
        # stored on its own (the enclosing query's entry holds the whole graph).
        later = getattr(self.top, "post_load_paths", None)
        before = self.later_before
        self.ctx.frames.append(frame)
        try:
            rows = next(source, None)
        except BaseException:
            self.end()
            raise
        finally:
            _pop(self.ctx, frame)
        if before is not None and later is not None and not before.issuperset(later):
            self.standalone = False
        try:
            self._finish(rows or [])
        finally:
            self.end()
        return rows

    def _finish(self, rows: list[Any]) -> None:
        ctx, info, cache, frame, ticket = self.ctx, self.info, self.ctx.cache, self.frame, self.ticket
        result = self.result() if self.result is not None else None
        if result is not None:
            made = template_from(result, self.requires_unique)
            if made is not None:
                info.templates.setdefault(self.mode, made)
            self.result = None
        deps: list[str] = []
        try:
            statement_tables = info.table_names
            graph = Graph(
                self.dialect, statement_tables if ticket is None else layout_of(ticket.mapper).tables
            )
            payload, generation = encode_result(
                rows, self.single, info.columns or [], frame, graph, cache.exclusions.of_mapper, info.labels
            )
            deps = sorted(set(self.statement_deps) | graph.deps | frame.deps)
            if not self.standalone:
                cache.count("unstorable")
            elif not tables_written(ctx, graph.tables | statement_tables):
                info.unstored = None
                recorder = cache.count.recorder
                if recorder is not None:
                    recorder.event("fills", info.model, self.label)
                fill = self.fill
                lease = fill.lease if fill is not None else None
                cache.io.submit_store(
                    StoreJob(
                        self.key,
                        payload,
                        deps,
                        generation,
                        self.ttl,
                        lease,
                        cache.refresh_ahead,
                        info.shape.digest,
                    )
                )
                if fill is not None:
                    fill.lease = None  # the store gives it back
            learn(self.plan, deps, layout_of(ticket.mapper).get_hint if ticket is not None else info.hint)
        except Unstorable as exc:
            cache.count("unstorable")
            refused(cache, "unstorable", f"its result is not stored: {exc}", info.model, self.label)
        except (CodecError, orjson.JSONEncodeError) as exc:  # orjson refuses e.g. lone surrogates
            cache.count("unencodable")
            info.unstored = f"the codec refused a value of its last result: {exc}"
            refused(cache, "unencodable", info.unstored, info.model, self.label)
        except Exception as exc:  # a bug of ours: the caller still gets its rows, nothing is stored
            cache.internal.error(exc, "while storing a result")
        for loaded_state, values in frame.fresh.items():
            remember(loaded_state, values, frame.generation)
        if ctx.frames:
            parent = ctx.frames[-1]
            parent.fresh.update(frame.fresh)
            parent.deps.update(deps or [deps_mod.ALL])
            if frame.unstorable:
                parent.unstorable = frame.unstorable
