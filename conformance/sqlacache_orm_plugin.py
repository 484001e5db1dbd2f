"""pytest plugin: run SQLAlchemy's own ORM test suite with ``sqlacache.CachingSession`` as ``Session``.

Loaded with ``-p sqlacache_orm_plugin -p no:sqlacache`` from the root of an extracted SQLAlchemy sdist
(``conformance/run_orm_suite.py`` does that). ``--sqlacache-mode``:

``off``    plain SQLAlchemy (the baseline); sqlacache is not even imported.
``warm``   one cache shared by every test of the run.
``cold``   the same cache, emptied (``invalidate_all()``) before each test.

The substitution happens at plugin load, before any test module is imported, so the suite's
``from sqlalchemy.orm import Session`` (and its subclasses of it) get ``CachingSession``. The run fails
(exit status 1) if a test module created no ``CachingSession`` or if the cache served no hit at all.
``--sqlacache-report=FILE`` writes every test's outcome, the failure's key frames and the internal
errors sqlacache survived (and logged) during each test, for the runner to compare with the baseline.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import traceback
from typing import Any

import pytest


def _option(name: str, default: str) -> str:
    """Read an option from the command line before pytest parses it: the substitution must happen at
    import time, before the suite's modules are collected (they bind ``Session`` when imported)."""
    for i, arg in enumerate(sys.argv):
        if arg == name and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return os.environ.get("SQLACACHE_CONFORMANCE_" + name.lstrip("-").upper().replace("-", "_"), default)


MODE = _option("--sqlacache-mode", "warm")
if MODE not in ("off", "warm", "cold"):
    raise pytest.UsageError(f"--sqlacache-mode must be off, warm or cold, not {MODE!r}")
OUTSIDE_WRITES = _option("--sqlacache-outside-writes", "ignore")
if OUTSIDE_WRITES not in ("invalidate", "ignore"):
    raise pytest.UsageError(
        f"--sqlacache-outside-writes must be invalidate or ignore, not {OUTSIDE_WRITES!r}"
    )

_SQLACACHE_DIR: str | None = None
_listeners: list[tuple[Any, str, Any, tuple[Any, ...], dict[str, Any]]] = []

if MODE != "off":
    if any(name == "sqlacache" or name.startswith("sqlacache.") for name in sys.modules):
        raise pytest.UsageError(
            "sqlacache was imported before sqlacache_orm_plugin, so its event listeners could not be "
            "recorded; run pytest with -p no:sqlacache (its own pytest11 plugin imports it)"
        )
    from sqlalchemy import event as _event
    from sqlalchemy.event import api as _event_api

    # The suite's RemoveORMEventsGlobally fixture clears every ORM event listener after a test,
    # sqlacache's included. Record what sqlacache registers at import so it can be put back.
    _real_listen = _event_api.listen

    def _recording_listen(target: Any, identifier: str, fn: Any, *args: Any, **kw: Any) -> None:
        _listeners.append((target, identifier, fn, args, kw))
        _real_listen(target, identifier, fn, *args, **kw)

    _event_api.listen = _recording_listen  # listens_for() calls it by this module's name
    _event.listen = _recording_listen
    try:
        import sqlacache
        from sqlacache import session as _session_mod
        from sqlacache.resilience import resilient as _resilient
    finally:
        _event_api.listen = _real_listen
        _event.listen = _real_listen
    _SQLACACHE_DIR = os.path.dirname(os.path.abspath(sqlacache.__file__)) + os.sep

    import sqlalchemy.orm
    import sqlalchemy.orm.session

    from sqlacache import CachingSession

    _original_session = sqlalchemy.orm.session.Session
    sqlalchemy.orm.Session = CachingSession  # type: ignore[misc]
    sqlalchemy.orm.session.Session = CachingSession  # type: ignore[misc]
    _kwdefaults = sqlalchemy.orm.sessionmaker.__init__.__kwdefaults__
    assert _kwdefaults is not None and _kwdefaults.get("class_") is _original_session
    _kwdefaults["class_"] = CachingSession  # sessionmaker()'s default, bound when it was defined
    # sqlalchemy.testing.fixtures.fixture_session() calls orm.Session(...) at call time: covered.

    CACHE = sqlacache.configure(backend=_option("--sqlacache-backend", "memory://"))

    _created: collections.Counter[str] = collections.Counter()
    _current_module = ["<import>"]
    _real_init = CachingSession.__init__

    def _counting_init(self: Any, *args: Any, **kw: Any) -> None:
        _real_init(self, *args, **kw)
        _created[_current_module[0]] += 1

    CachingSession.__init__ = _counting_init  # type: ignore[method-assign]

    _internal: list[dict[str, Any]] = []
    _real_internal_error = _resilient.Resilient.internal_error

    def _recording_internal_error(self: Any, where: str, exc: BaseException) -> None:
        _internal.append({"where": where, **_describe(exc)})
        _real_internal_error(self, where, exc)

    _resilient.Resilient.internal_error = _recording_internal_error  # type: ignore[method-assign]

    if OUTSIDE_WRITES == "invalidate":
        from sqlalchemy import Table
        from sqlalchemy.engine import Engine
        from sqlalchemy.sql.elements import TextClause

        from sqlacache.analysis.dependencies import table_name
        from sqlacache.write.tracker import _TAG

        # The suite's fixtures create, fill, empty and drop tables with Core, on connections no
        # session owns. sqlacache now tracks such writes itself (connection_writes.py); this
        # is what an application had to do before (cache.invalidate(tables=...) after them), kept
        # to tell a staleness of sqlacache's Core-write tracking from one of its session path.
        def _session_owns(conn: Any) -> bool:
            # Not just "conn.info is tagged": info belongs to the DBAPI connection, which SQLite's
            # pools share between every Connection of a thread, the fixtures' included.
            tag = conn.info.get(_TAG)
            trans = getattr(tag(), "_transaction", None) if tag is not None else None
            while trans is not None:
                if any(entry[0] is conn for entry in trans._connections.values()):
                    return True
                trans = trans._parent
            return False

        @_event.listens_for(Engine, "after_cursor_execute")
        def _outside_write(
            conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
        ) -> None:
            if _session_owns(conn):
                return  # sqlacache tracks what a session's own connection writes
            compiled = context.compiled
            if compiled is not None and (context.isinsert or context.isupdate or context.isdelete):
                CACHE.invalidate(tables=[table_name(compiled.statement.table)])
            elif compiled is not None and context.isddl:
                element = getattr(compiled.statement, "element", None)
                if isinstance(element, Table):
                    CACHE.invalidate(tables=[table_name(element)])
                else:
                    CACHE.invalidate_all()
            elif compiled is None or isinstance(compiled.statement, TextClause):
                verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
                if verb not in (
                    "SELECT",
                    "PRAGMA",
                    "WITH",
                    "BEGIN",
                    "COMMIT",
                    "ROLLBACK",
                    "SAVEPOINT",
                    "RELEASE",
                ):
                    CACHE.invalidate_all()

        _listeners.append((Engine, "after_cursor_execute", _outside_write, (), {}))
    assert _session_mod.CachingSession is CachingSession


def _restore_listeners() -> None:
    from sqlalchemy import event

    for target, identifier, fn, args, kw in _listeners:
        if not event.contains(target, identifier, fn):
            event.listen(target, identifier, fn, *args, **kw)


def _frame(fs: traceback.FrameSummary) -> str:
    path = fs.filename
    if _SQLACACHE_DIR and path.startswith(_SQLACACHE_DIR):
        path = "sqlacache/" + path[len(_SQLACACHE_DIR) :]
    else:
        path = re.sub(r".*/(sqlalchemy|test)/", r"\1/", path)
    return f"{path}:{fs.lineno} {fs.name}: {(fs.line or '').strip()}"


def _describe(exc: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if _SQLACACHE_DIR and f.filename.startswith(_SQLACACHE_DIR)]
    testing = [f for f in frames if f"{os.sep}sqlalchemy{os.sep}testing{os.sep}" in f.filename]
    suite = [f for f in frames if f"{os.sep}test{os.sep}" in f.filename]
    cause = exc.__cause__ or exc.__context__
    out: dict[str, Any] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".replace("builtins.", ""),
        "message": str(exc)[:3000],
        "sqlacache": [_frame(f) for f in ours[-4:]],
        "testing": _frame(testing[-1]) if testing else None,
        "test": _frame(suite[-1]) if suite else None,
        "last": [_frame(f) for f in frames[-3:]],
    }
    if cause is not None and cause is not exc and not out["sqlacache"]:
        inner = _describe(cause) if cause.__traceback__ is not exc.__traceback__ else None
        if inner and inner["sqlacache"]:
            out["cause"] = inner
    return out


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sqlacache-conformance")
    group.addoption("--sqlacache-mode", default="warm", help="off (baseline), warm or cold")
    group.addoption("--sqlacache-backend", default="memory://", help="backend of the shared cache")
    group.addoption("--sqlacache-report", default=None, help="write outcomes as JSON to this file")
    group.addoption(
        "--sqlacache-outside-writes",
        default="ignore",
        help="ignore (default): sqlacache tracks Core writes outside sessions itself; invalidate: "
        "the plugin evicts what they touch too",
    )


class _Recorder:
    def __init__(self) -> None:
        self.results: dict[str, dict[str, Any]] = {}
        self.modules: dict[str, dict[str, int]] = collections.defaultdict(
            lambda: {"tests": 0, "sessions": 0, "hits": 0, "misses": 0}
        )

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        module = item.nodeid.split("::", 1)[0]
        self.modules[module]["tests"] += 1
        if MODE == "off":
            return
        _current_module[0] = module
        _restore_listeners()
        if MODE == "cold":
            CACHE.invalidate_all()
        stats = CACHE.stats()
        item.stash[_before] = (stats["hits"], stats["misses"], len(_internal))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        outcome = yield
        report = outcome.get_result()
        entry = self.results.setdefault(item.nodeid, {"outcome": "passed"})
        if report.failed:
            entry["outcome"] = "failed" if call.when == "call" else "error"
            entry.setdefault("when", call.when)
            if call.excinfo is not None and "error" not in entry:
                entry["error"] = _describe(call.excinfo.value)
        elif report.skipped and call.when in ("setup", "call") and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
        if call.when == "teardown" and MODE != "off" and _before in item.stash:
            hits, misses, n = item.stash[_before]
            stats = CACHE.stats()
            module = self.modules[item.nodeid.split("::", 1)[0]]
            module["hits"] += stats["hits"] - hits
            module["misses"] += stats["misses"] - misses
            entry["hits"] = stats["hits"] - hits
            if len(_internal) > n:
                entry["internal_errors"] = _internal[n:]

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        problems = []
        if MODE != "off":
            for module, counts in self.modules.items():
                counts["sessions"] = _created.get(module, 0)
                if counts["tests"] and not counts["sessions"]:
                    problems.append(f"{module}: no CachingSession was created (the substitution failed)")
            total = CACHE.stats()
            if self.modules and total["hits"] == 0:
                problems.append("the cache served no hit in the whole run")
        else:
            total = {}
        path = session.config.getoption("--sqlacache-report")
        if path:
            with open(path, "w") as f:
                json.dump(
                    {
                        "mode": MODE,
                        "outside_writes": OUTSIDE_WRITES,
                        "stats": {k: v for k, v in total.items() if isinstance(v, (int, float, str))},
                        "modules": self.modules,
                        "problems": problems,
                        "results": self.results,
                    },
                    f,
                    indent=1,
                )
        if problems:
            for problem in problems:
                sys.stderr.write(f"sqlacache conformance: {problem}\n")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


_before = pytest.StashKey[tuple[int, int, int]]()


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--sqlacache-mode") != MODE:
        raise pytest.UsageError("--sqlacache-mode must be given as a separate argument (read at import)")
    config.pluginmanager.register(_Recorder(), "sqlacache-conformance-recorder")
