"""The public API documents itself: ``help()`` and the generated configuration reference
(docs/configuration.rst, autodoc) show a docstring for every public name, and every parameter of
``Cache`` is described there — a new option without its documentation fails here."""

from __future__ import annotations

import inspect

import pytest

import sqlacache
from sqlacache import Cache

# Documented inside another parameter's entry (its older spelling).
ALIASES = {"default_timeout": "default_ttl"}


@pytest.mark.parametrize("name", sqlacache.__all__)
def test_every_public_name_has_its_own_docstring(name: str) -> None:
    obj = getattr(sqlacache, name)
    doc = obj.__doc__
    assert doc and doc.strip(), f"sqlacache.{name} has no docstring"
    if inspect.isclass(obj):
        inherited = {base.__doc__ for base in obj.__mro__[1:]}
        assert doc not in inherited, f"sqlacache.{name} only inherits its docstring"


def test_every_cache_parameter_is_described() -> None:
    doc = Cache.__doc__ or ""
    for name in inspect.signature(Cache).parameters:
        if name in ALIASES:
            assert f"``{name}``" in doc and f":param {ALIASES[name]}:" in doc, name
        else:
            assert f":param {name}:" in doc, f"Cache({name}=…) is not described in Cache's docstring"


def test_every_public_method_of_cache_has_a_docstring() -> None:
    missing = [
        name
        for name, member in vars(Cache).items()
        if not name.startswith("_") and callable(member) and not (member.__doc__ or "").strip()
    ]
    assert not missing, missing


def test_help_shows_the_parameters() -> None:
    text = pydoc_text(Cache)
    assert "near_heartbeat" in text and "ConfigurationError" in text


def pydoc_text(obj: object) -> str:
    import pydoc

    return pydoc.render_doc(obj, renderer=pydoc.plaintext)
