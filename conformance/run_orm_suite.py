#!/usr/bin/env python
"""Run SQLAlchemy's own ORM test suite with sqlacache.CachingSession in place of Session.

Fetches the sdist of the installed SQLAlchemy (cached outside the repository), runs the chosen
test/orm modules once with plain Session (the baseline, cached too) and once per mode with
``sqlacache_orm_plugin``, and fails if a test that passes with plain Session fails with caching
unless ``orm_allowlist.txt`` names it with a reason.

    python conformance/run_orm_suite.py --mode both
    python conformance/run_orm_suite.py --mode warm --modules test_merge test_expire
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Chosen for what a read cache touches (get, queries, relationship loading, expiry, merge, flush,
# events, versioning, polymorphic loading) and for running on SQLite in under two minutes a mode.
DEFAULT_MODULES = [
    "test_session",
    "test_transaction",
    "test_query",
    "test_merge",
    "test_expire",
    "test_events",
    "test_eager_relations",
    "test_lazy_relations",
    "test_selectin_relations",
    "test_subquery_relations",
    "test_immediate_load",
    "test_deferred",
    "test_cascade",
    "test_unitofwork",
    "test_unitofworkv2",
    "test_versioning",
    "test_load_on_fks",
    "test_relationships",
    "test_naturalpks",
    "test_backref_mutations",
    "test_dynamic",
    "test_froms",
    "test_of_type",
    "test_composites",
    "test_scoping",
    "test_bind",
    "inheritance/test_basic",
    "inheritance/test_poly_loading",
    "inheritance/test_polymorphic_rel",
    "inheritance/test_single",
    "inheritance/test_relationship",
]

# Node ids carry the database the class ran on ("Test_sqlite+pysqlite_3_40_1::test_x") when more
# than one is configured; the allowlist shouldn't depend on the SQLite version of the machine.
_DIALECT_SUFFIX = re.compile(r"_[A-Za-z0-9]+\+[A-Za-z0-9_]+?_[0-9_]+(?=::|$)")


def normalise(nodeid: str) -> str:
    return _DIALECT_SUFFIX.sub("", nodeid)


def installed_sqlalchemy_version() -> str:
    import sqlalchemy

    return str(sqlalchemy.__version__)


def ensure_sdist(version: str, cache_dir: Path) -> Path:
    """The extracted sdist of SQLAlchemy ``version`` (downloaded once with pip, then reused)."""
    root = cache_dir / f"sqlalchemy-{version}"
    if (root / "test" / "orm").is_dir() and (root / "lib" / "sqlalchemy" / "testing").is_dir():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    download = cache_dir / "dl"
    archives = sorted(download.glob(f"[sS][qQ][lL][aA]lchemy-{version}.tar.gz"))
    if not archives:
        print(f"downloading the SQLAlchemy {version} sdist into {download}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"sqlalchemy=={version}", "-d", str(download)],
            check=True,
        )  # fmt: skip
        archives = sorted(download.glob(f"[sS][qQ][lL][aA]lchemy-{version}.tar.gz"))
    if not archives:
        raise SystemExit(f"pip download left no sqlalchemy-{version}.tar.gz in {download}")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp, tarfile.open(archives[0]) as tar:
        tar.extractall(tmp, filter="data")
        (extracted,) = Path(tmp).iterdir()
        if root.exists():
            shutil.rmtree(root)
        extracted.rename(root)
    return root


def run_pytest(
    sdist: Path, modules: list[str], mode: str, report: Path, args: argparse.Namespace, use_sdist_lib: bool
) -> tuple[dict[str, Any], float, int]:
    paths = [str(REPO), str(HERE)] + ([str(sdist / "lib")] if use_sdist_lib else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]))
    cmd = [
        sys.executable,
        # -s keeps the suite's conftest from putting the sdist's lib/ first: the installed SQLAlchemy
        # (the one sqlacache runs with, C extensions included) is the one under test.
        *(["-s"] if not use_sdist_lib else []),
        "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:sqlacache", "-p", "sqlacache_orm_plugin",
        "--sqlacache-mode", mode, "--sqlacache-report", str(report), "--sqlacache-backend", args.backend,
        "--sqlacache-outside-writes", args.outside_writes,
        "-o", "addopts=", "--tb=no", "-rN",
        *[f"test/orm/{m}.py" for m in modules],
    ]  # fmt: skip
    print(f"--- {mode}: {len(modules)} modules", flush=True)
    started = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=sdist, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    elapsed = time.monotonic() - started
    # SQLAlchemy's own summary line is reworded: its "N failed" counts tests that fail with plain
    # Session too, and a log reader should not take them for failures of this project's tests.
    summary = re.findall(r"(\d+) (passed|failed|skipped|errors?)", proc.stdout[-2000:])
    said = ", ".join(f"{word}: {n}" for n, word in summary)
    print(f"--- {mode}: SQLAlchemy's suite ran in {elapsed:.0f}s", flush=True)
    print(f"    pytest exit {proc.returncode}; {said}", flush=True)
    if not report.exists():
        print(proc.stdout[-5000:])
        raise SystemExit(f"pytest ({mode}) wrote no report: it crashed")
    data: dict[str, Any] = json.loads(report.read_text())
    data["results"] = {normalise(k): v for k, v in data["results"].items()}
    return data, elapsed, proc.returncode


def baseline(
    sdist: Path, modules: list[str], args: argparse.Namespace, use_sdist_lib: bool
) -> dict[str, Any]:
    """Outcomes with plain Session, per module; cached in ``--baseline`` and extended as needed."""
    path = Path(args.baseline)
    known: dict[str, Any] = (
        json.loads(path.read_text()) if path.exists() and not args.refresh_baseline else {}
    )
    missing = [m for m in modules if m not in known]
    if missing:
        with tempfile.TemporaryDirectory() as tmp:
            data, _, _ = run_pytest(sdist, missing, "off", Path(tmp) / "off.json", args, use_sdist_lib)
        for m in missing:
            prefix = f"test/orm/{m}.py::"
            known[m] = {k: v["outcome"] for k, v in data["results"].items() if k.startswith(prefix)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known, indent=1, sort_keys=True))
    return {k: v for m in modules for k, v in known[m].items()}


def read_allowlist(path: Path) -> list[tuple[str | None, str, str]]:
    """``[warm:|cold:]<node id or glob>  # reason`` per line; a line without a reason is an error."""
    entries = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, reason = line.partition(" #")
        if not sep or not reason.strip():
            raise SystemExit(f"{path}:{n}: an allowlisted test needs a reason: '<node id>  # <why>'")
        mode = None
        pattern = pattern.strip()
        if pattern.startswith(("warm:", "cold:")):
            mode, pattern = pattern.split(":", 1)
        entries.append((mode, normalise(pattern), reason.strip()))
    return entries


def matches(nodeid: str, pattern: str) -> bool:
    """fnmatch with ``*`` and ``?`` only: brackets are literal (they hold pytest's parameter ids)."""
    escaped = re.sub(r"[\[\]]", lambda m: f"[{m.group(0)}]", pattern)
    return fnmatch.fnmatchcase(nodeid, escaped)


def allowed(entries: list[tuple[str | None, str, str]], mode: str, nodeid: str) -> str | None:
    for entry_mode, pattern, reason in entries:
        if entry_mode in (None, mode) and matches(nodeid, pattern):
            return reason
    return None


def group_key(error: dict[str, Any] | None) -> str:
    """Root cause of a failure: the exception and the sqlacache line it left from, else the assertion."""
    if not error:
        return "(no exception recorded)"
    err: dict[str, Any] = error["cause"] if not error["sqlacache"] and error.get("cause") else error
    if err["sqlacache"]:
        return f"{err['type']} at {err['sqlacache'][-1].split(': ', 1)[0]}"
    where = err.get("testing") or (err["last"][-1] if err["last"] else "?")
    message = re.sub(r"0x[0-9a-f]+|\d+", "N", err["message"].splitlines()[0] if err["message"] else "")[:110]
    return f"{err['type']} from {where.split(': ', 1)[0]}: {message}"


def write_failures(
    path: Path, runs: dict[str, dict[str, Any]], divergences: dict[str, dict[str, Any]]
) -> None:
    lines = [
        "# sqlacache vs SQLAlchemy's ORM test suite: divergences",
        "",
        "Tests that pass with plain `Session` and fail with `CachingSession` (generated by",
        "`conformance/run_orm_suite.py --failures-md`). Grouped by root cause: the exception and the",
        "innermost sqlacache frame it came through, or, when no sqlacache frame is on the stack, the",
        "assertion helper and message.",
        "",
    ]
    for mode, run in runs.items():
        lines.append(
            f"- {mode}: {len(divergences[mode])} divergences; run {run['elapsed']:.0f}s; "
            f"outside_writes={run['data'].get('outside_writes')}; stats {run['data']['stats']}"
        )
    for mode, found in divergences.items():
        groups: dict[str, list[tuple[str, dict[str, Any]]]] = collections.defaultdict(list)
        for nodeid, entry in found.items():
            groups[group_key(entry.get("error"))].append((nodeid, entry))
        lines += ["", f"## Mode {mode}: {len(found)} divergences in {len(groups)} groups", ""]
        for n, (key, members) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1])), 1):
            modules = collections.Counter(nodeid.split("::")[0].rsplit("/", 1)[-1] for nodeid, _ in members)
            lines += [f"### {mode}-{n}. {len(members)} x `{key}`", ""]
            lines.append("modules: " + ", ".join(f"{m} {c}" for m, c in modules.most_common()))
            lines.append("")
            for nodeid, entry in members[:2]:
                err = entry.get("error") or {}
                lines.append(f"- `{nodeid}` ({entry['outcome']} in {entry.get('when')})")
                lines.append(f"  - {err.get('type')}: {(err.get('message') or '').splitlines()[:1]}")
                for frame in err.get("sqlacache") or (err.get("cause") or {}).get("sqlacache") or []:
                    lines.append(f"  - `{frame}`")
                if err.get("test"):
                    lines.append(f"  - test: `{err['test']}`")
                for frame in err.get("last", [])[-2:]:
                    lines.append(f"  - last: `{frame}`")
            lines.append("")
    internal: dict[str, list[str]] = collections.defaultdict(list)
    for mode, run in runs.items():
        for nodeid, entry in run["data"]["results"].items():
            for err in entry.get("internal_errors", []):
                frame = err["sqlacache"][-1].split(": ", 1)[0] if err["sqlacache"] else "?"
                internal[f"{err['where']}: {err['type']} at {frame}: {err['message'][:120]}"].append(
                    f"{mode} {nodeid}"
                )
    lines += ["", "## Internal errors sqlacache survived (logged, fell back to the database)", ""]
    if not internal:
        lines.append("none")
    for key, where in sorted(internal.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- {len(where)} x `{key}` — e.g. `{where[0]}`")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["warm", "cold", "both"], default="both")
    parser.add_argument(
        "--modules",
        nargs="+",
        default=DEFAULT_MODULES,
        help="modules under test/orm, e.g. test_merge inheritance/test_single",
    )
    parser.add_argument("--sqlalchemy-version", default=None, help="default: the installed one")
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("SQLACACHE_CONFORMANCE_CACHE", "~/.cache/sqlacache-conformance"),
        help="where the sdist and the baseline are kept",
    )
    parser.add_argument("--baseline", default=None, help="JSON of plain-Session outcomes (made if missing)")
    parser.add_argument("--refresh-baseline", action="store_true", help="rerun the plain-Session baseline")
    parser.add_argument("--allowlist", default=str(HERE / "orm_allowlist.txt"))
    parser.add_argument("--backend", default="memory://", help="the shared cache's backend")
    parser.add_argument(
        "--outside-writes",
        choices=["ignore", "invalidate"],
        default="ignore",
        help="ignore: leave the suite's Core writes outside sessions to sqlacache's own tracking "
        "(default); invalidate: the plugin also evicts what they touch, as applications had to",
    )
    parser.add_argument("--report-dir", default=None, help="keep each mode's JSON report here")
    parser.add_argument("--failures-md", default=None, help="write the grouped divergences here")
    args = parser.parse_args()
    args.modules = [m.removesuffix(".py").removeprefix("test/orm/") for m in args.modules]

    installed = installed_sqlalchemy_version()
    version = args.sqlalchemy_version or installed
    use_sdist_lib = version != installed
    if use_sdist_lib:
        print(f"SQLAlchemy {version} is not the installed {installed}: testing the sdist's pure-Python lib/")
    cache_dir = Path(args.cache_dir).expanduser()
    sdist = ensure_sdist(version, cache_dir)
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    args.baseline = args.baseline or str(cache_dir / f"baseline-{version}-{py}.json")
    allowlist = read_allowlist(Path(args.allowlist))

    plain = baseline(sdist, args.modules, args, use_sdist_lib)
    modes = ["warm", "cold"] if args.mode == "both" else [args.mode]
    runs: dict[str, dict[str, Any]] = {}
    divergences: dict[str, dict[str, Any]] = {}
    failed = False
    report_dir = Path(args.report_dir) if args.report_dir else Path(tempfile.mkdtemp(prefix="sqlacache-orm-"))
    report_dir.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        data, elapsed, code = run_pytest(
            sdist, args.modules, mode, report_dir / f"{mode}.json", args, use_sdist_lib
        )
        runs[mode] = {"data": data, "elapsed": elapsed}
        results = data["results"]
        found = {
            k: results[k]
            for k, outcome in plain.items()
            if outcome == "passed" and k in results and results[k]["outcome"] in ("failed", "error")
        }
        vanished = [k for k, outcome in plain.items() if outcome == "passed" and k not in results]
        divergences[mode] = found
        bad = {k: v for k, v in found.items() if allowed(allowlist, mode, k) is None}
        print(f"\n== {mode}: {len(found)} divergences, {len(found) - len(bad)} allowlisted, {len(bad)} not")
        per_module = collections.Counter(k.split("::")[0] for k in found)
        bad_per_module = collections.Counter(k.split("::")[0] for k in bad)
        for module, counts in sorted(data["modules"].items()):
            print(
                f"   {module:45} tests {counts['tests']:4}  sessions {counts.get('sessions', 0):5}  "
                f"hits {counts.get('hits', 0):5}  divergences {per_module[module]:4}  "
                f"not allowlisted {bad_per_module[module]:4}"
            )
        for k in sorted(bad):
            err = bad[k].get("error") or {}
            print(f"   DIVERGES {k}: {err.get('type')}: {(err.get('message') or '').splitlines()[:1]}")
        for k in vanished:
            print(f"   MISSING {k}: passed with plain Session, not run with caching")
        for problem in data["problems"]:
            print(f"   PROBLEM {problem}")
        if bad or vanished or data["problems"] or code not in (0, 1):
            failed = True
    stale = [
        (mode, pattern)
        for mode, pattern, _ in allowlist
        if not any(matches(k, pattern) for m in modes if mode in (None, m) for k in divergences[m])
        and any(matches(k, pattern) for k in plain)
    ]
    for mode, pattern in stale:
        print(f"   note: allowlisted but no longer diverging: {(mode + ':') if mode else ''}{pattern}")
    if args.failures_md:
        write_failures(Path(args.failures_md), runs, divergences)
        print(f"grouped divergences written to {args.failures_md}")
    print(f"reports in {report_dir}")
    print("FAILED: divergences not in the allowlist, or a problem above" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
