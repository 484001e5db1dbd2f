"""What ``pip install`` gets: the wheel built from this tree ships the Lua scripts, the backend test
kit and the type marker, and the scripts load from the installed package, not from the tree."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_the_lua_scripts_the_test_kit_and_py_typed(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("sqlacache-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    lua = {p.name for p in (ROOT / "sqlacache" / "backends" / "redis" / "lua").glob("*.lua")}
    assert lua, "no Lua scripts in the tree"
    assert {f"sqlacache/backends/redis/lua/{n}" for n in lua} <= names
    assert {"sqlacache/testing/__init__.py", "sqlacache/testing/backends.py", "sqlacache/py.typed"} <= names
    assert not any(n.startswith("tests/") for n in names)
    # The scripts are read with importlib.resources: from the wheel, on its own, they load.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from sqlacache.backends.redis import scripts; "
        "assert scripts.__file__.startswith(sys.argv[1]), scripts.__file__; "
        "assert b'redis.call' in scripts.LOOKUP and b'redis.call' in scripts.STORE"
    )
    subprocess.run([sys.executable, "-c", code, str(wheel)], check=True, timeout=60, cwd=tmp_path)


def test_the_sdist_ships_every_folder_the_docs_tell_a_reader_to_run_from() -> None:
    """docs/internals.rst says ``python conformance/run_orm_suite.py``: from an unpacked sdist, that
    folder must be there (it was not). Every top-level folder of this tree that the docs or README
    name in a path is in the sdist's include list."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the tree is the same under 3.10

    include = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["sdist"][
            "include"
        ]
    )
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    text = "\n".join(p.read_text() for p in [ROOT / "README.rst", *(ROOT / "docs").glob("*.rst")])
    named = {m for m in re.findall(r"(?<![\w./-])([a-z_]+)/[\w./-]+", text) if m in folders}
    assert named, "the check found no paths in the docs"
    assert named <= include, f"folders the docs name but the sdist leaves out: {sorted(named - include)}"
