"""Exact codecs for PostgreSQL's network and range types (INET, CIDR, ranges, multiranges).

psycopg 3 and asyncpg both hand these back, through SQLAlchemy, as ``ipaddress`` objects and as
SQLAlchemy's own ``Range``/``MultiRange``: the codec rebuilds exactly those, never a string. Range
bounds go through the generic tagged form (ints, Decimals, dates, datetimes with their zone), so a
``tstzrange`` read through psycopg (``ZoneInfo('Etc/UTC')``) and through asyncpg (``timezone.utc``)
each come back as their driver returned them. MACADDR, MACADDR8 and MONEY come back as strings from
both drivers and use the string codec.

Wire format: an address, interface or network is its text form after a one-letter tag of its class
(``"i10.0.0.1/24"``); a range is ``[lower, upper, bounds, empty]``; a multirange a list of ranges.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Final

from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql.ranges import AbstractMultiRange, AbstractSingleRange, MultiRange, Range

from sqlacache.analysis import generic
from sqlacache.analysis.generic import describe, escape, unescape
from sqlacache.analysis.scalars import CodecError

_Range: Final = Range
_MultiRange: Final = MultiRange

_IP_TAGS: Final[dict[type, str]] = {
    ipaddress.IPv4Address: "a",
    ipaddress.IPv6Address: "A",
    ipaddress.IPv4Interface: "i",
    ipaddress.IPv6Interface: "I",
    ipaddress.IPv4Network: "n",
    ipaddress.IPv6Network: "N",
}
_IP_CLASSES: Final[dict[str, type]] = {tag: cls for cls, tag in _IP_TAGS.items()}
_BOUNDS: Final = frozenset({"[)", "(]", "[]", "()"})

NETWORK_TYPES: Final[tuple[type, ...]] = (pg.INET, pg.CIDR)
RANGE_TYPES: Final[tuple[type, ...]] = (AbstractSingleRange,)
MULTIRANGE_TYPES: Final[tuple[type, ...]] = (AbstractMultiRange,)
TEXT_TYPES: Final[tuple[type, ...]] = (pg.MACADDR, pg.MACADDR8, pg.MONEY)


def enc_ip(v: Any) -> Any:
    tag = _IP_TAGS.get(type(v))
    if tag is not None:
        return tag + str(v)
    return None if v is None else escape(v)


def dec_ip(x: Any) -> Any:
    if type(x) is str:
        cls = _IP_CLASSES.get(x[:1])
        if cls is None:
            raise CodecError(f"invalid address payload: {describe(x)}")
        try:
            return cls(x[1:])
        except ValueError as exc:
            raise CodecError(f"invalid address payload: {exc}") from None
    return None if x is None else unescape(x)


def _enc_range(v: Any) -> list[Any]:
    return [generic.encode(v.lower), generic.encode(v.upper), v.bounds, v.empty]


def _dec_range(x: Any) -> Any:
    if type(x) is not list or len(x) != 4 or x[2] not in _BOUNDS or type(x[3]) is not bool:
        raise CodecError(f"invalid range payload: {describe(x)}")
    return _Range(generic.decode(x[0]), generic.decode(x[1]), bounds=x[2], empty=x[3])


def enc_range(v: Any) -> Any:
    if type(v) is _Range:
        return _enc_range(v)
    return None if v is None else escape(v)


def dec_range(x: Any) -> Any:
    if type(x) is list:
        return _dec_range(x)
    return None if x is None else unescape(x)


def enc_multirange(v: Any) -> Any:
    if type(v) is _MultiRange:
        out = []
        for r in v:
            if type(r) is not _Range:
                return escape(v)  # refused there, with the type named
            out.append(_enc_range(r))
        return out
    return None if v is None else escape(v)


def dec_multirange(x: Any) -> Any:
    if type(x) is list:
        return _MultiRange(_dec_range(r) for r in x)
    return None if x is None else unescape(x)
