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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("sqlacache-*.whl")
    return built


def test_the_wheel_ships_the_lua_scripts_the_test_kit_and_py_typed(wheel, tmp_path):
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


def test_the_readme_quick_start_runs_from_the_wheel_alone(wheel, tmp_path):
    """What a user who ran ``pip install sqlacache`` has: the package from the wheel, in a directory
    that is not this checkout, runs the README's quick start; each integration module is in it."""
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", (ROOT / "README.rst").read_text())
    (tmp_path / "quickstart.py").write_text(re.sub(r"^   ", "", blocks[0], flags=re.M))
    code = (
        "import sys, runpy; sys.path.insert(0, sys.argv[1]); "
        "import sqlacache, sqlacache.integrations.sqlmodel, sqlacache.flask, sqlacache.litestar; "
        "assert sqlacache.__file__.startswith(sys.argv[1]), sqlacache.__file__; "
        "runpy.run_path('quickstart.py', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(wheel)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "'hits': 1" in done.stdout


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
