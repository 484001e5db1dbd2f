"""The ``pip install`` line a framework section of docs/integrations.rst starts with installs what
that section's code imports and what its commands run: a new user copies the line into a fresh
virtualenv, then the code, and must not meet ``ModuleNotFoundError`` (``aiosqlite`` for a
``sqlite+aiosqlite://`` URL, ``uvicorn`` for ``litestar run``).

The pages' code itself runs as tests (docs/conftest.py) in the project's own environment, which has
every package installed, so it cannot catch a package the page forgets to tell the user about."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "integrations.rst"

# What each requirement of a pip line provides: import names and console commands.
PROVIDES: dict[str, set[str]] = {
    "sqlacache": {"sqlacache", "sqlalchemy", "redis", "orjson"},
    "sqlacache[sqlmodel]": {"sqlmodel", "pydantic"},
    "sqlacache[flask]": {"flask", "flask_sqlalchemy", "flask-cli"},
    "sqlacache[litestar]": {"litestar", "advanced_alchemy", "httpx"},
    "fastapi": {"fastapi", "pydantic"},
    "uvicorn": {"uvicorn", "uvicorn-cli", "litestar-cli"},
    "aiosqlite": {"aiosqlite"},
    "asyncpg": {"asyncpg"},
}
STDLIB = {"asyncio", "collections", "contextlib", "os", "sys", "tempfile", "typing", "__future__"}


def _sections() -> dict[str, str]:
    text = PAGE.read_text()
    parts = re.split(r"\n([^\n]+)\n-{3,}\n", text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _needs(section: str) -> set[str]:
    """Import names and commands of the section's visible code, its literalincludes and commands."""
    code = "\n".join(re.findall(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", section))
    for included in re.findall(r"\.\. literalinclude:: \.\./(\S+)", section):
        code += "\n" + (ROOT / included).read_text()
    needs = {m.split(".")[0] for m in re.findall(r"^\s*(?:from|import) ([\w.]+)", code, re.M)}
    needs -= STDLIB
    if "sqlite+aiosqlite" in code:
        needs.add("aiosqlite")
    commands = re.findall(r"^\s*\$ (?:\w+=\S+ )*(\w+)(?: --app \S+ (run))?", section, re.M)
    for command, sub in commands:
        if command == "uvicorn":
            needs.add("uvicorn-cli")
        elif command == "litestar" and sub:
            needs.add("litestar-cli")
        elif command == "flask":
            needs.add("flask-cli")
    return needs


def _installed(section: str) -> set[str]:
    provided: set[str] = set()
    for line in re.findall(r"^\s*\$ pip install (.*)$", section, re.M):
        for requirement in line.split("#")[0].split():
            requirement = requirement.strip("\"'")
            if requirement.startswith("sqlacache"):
                provided |= PROVIDES["sqlacache"]
            provided |= PROVIDES.get(requirement, {requirement})
    return provided


@pytest.mark.parametrize(
    "title", ["SQLModel", "FastAPI", "Flask (Flask-SQLAlchemy)", "Litestar (advanced-alchemy)"]
)
def test_a_sections_pip_line_installs_what_its_code_imports(title: str) -> None:
    section = _sections()[title]
    assert "pip install" in section, f"{title}: no pip install line"
    missing = _needs(section) - _installed(section)
    assert not missing, f"{title}: the page's pip install line does not install {sorted(missing)}"


def test_the_check_sees_a_missing_driver() -> None:
    """The check itself fails on the line the SQLModel section had before: no aiosqlite."""
    section = _sections()["SQLModel"].replace(" aiosqlite ", " ", 1)
    assert "aiosqlite" in _needs(section) - _installed(section)
