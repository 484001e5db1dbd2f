"""``stats`` and ``inspect``: what a prefix holds in Redis, and one entry taken apart.

The key layout (``backends/redis``): ``<prefix>:e:<key>`` entries, ``<prefix>:v:<dependency>``
versions, ``<prefix>:l:<key>`` fill leases, ``<prefix>:r:<key>`` refresh claims, ``<prefix>:gen``
the generation, ``<prefix>:seq`` the fan-out sequence. An entry's value is
``<generation>\\x1f<dependency>\\x1f…\\n`` then the envelope (``\\xa7q`` and the refresh-ahead time)
and the codec's JSON payload.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from typing import Any

import orjson

from sqlacache.cli.server import OK, PROBLEMS, Failed, Target, shown

_KINDS = {b"e": "entries", b"v": "versions", b"l": "leases", b"r": "refresh_claims"}
_ENVELOPE = struct.Struct(">2sQ")
_MAGIC = b"\xa7q"


def _glob(prefix: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]\\" else c for c in prefix) + ":*"


def collect(target: Target) -> dict[str, Any]:
    ours = target.prefix.encode() + b":"
    counts: Counter[str] = Counter()
    for key in target.client.scan_iter(match=_glob(target.prefix), count=1000):
        rest = key[len(ours) :] if key.startswith(ours) else b""
        kind = _KINDS.get(rest.split(b":", 1)[0]) if b":" in rest else None
        if kind is not None:
            counts[kind] += 1
        elif rest in (b"gen", b"seq", b"run"):
            counts["metadata"] += 1
    generation = target.client.get(f"{target.prefix}:gen")
    memory: dict[str, Any] = target.client.info("memory")
    server: dict[str, Any] = target.client.info("stats")
    return {
        "url": shown(target.url),
        "prefix": target.prefix,
        "entries": counts["entries"],
        "versions": counts["versions"],
        "leases": counts["leases"],
        "refresh_claims": counts["refresh_claims"],
        "generation": int(generation) if generation and generation.isdigit() else None,
        "server": {
            "used_memory": memory.get("used_memory"),
            "maxmemory": memory.get("maxmemory"),
            "maxmemory_policy": memory.get("maxmemory_policy"),
            "evicted_keys": server.get("evicted_keys"),
            "expired_keys": server.get("expired_keys"),
            "keyspace_hits": server.get("keyspace_hits"),
            "keyspace_misses": server.get("keyspace_misses"),
        },
    }


def run_stats(target: Target, as_json: bool) -> int:
    found = collect(target)
    if as_json:
        print(json.dumps(found, indent=2, sort_keys=True))
        return OK
    print(f"prefix {found['prefix']!r} on {found['url']}")
    for name in ("entries", "versions", "leases", "refresh_claims", "generation"):
        print(f"  {name:<18}{found[name] if found[name] is not None else '-'}")
    print("server (all prefixes)")
    for name, value in found["server"].items():
        print(f"  {name:<18}{value if value is not None else '-'}")
    return OK


def _entry_key(target: Target, key: str) -> str:
    """``KEY`` as printed by ``redis-cli --scan`` (with the prefix) or as the cache names it."""
    if key.startswith(f"{target.prefix}:"):
        return key
    return f"{target.prefix}:e:{key}"


def _preview(payload: bytes, limit: int = 400) -> str:
    try:
        text = orjson.dumps(orjson.loads(payload)).decode()
    except orjson.JSONDecodeError:
        return f"(not JSON, {len(payload)} bytes) {payload[: limit // 4].hex()}"
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def describe(target: Target, key: str) -> dict[str, Any] | None:
    full = _entry_key(target, key)
    raw = target.client.get(full) if target.client.type(full) == b"string" else None
    if raw is None:
        kind = target.client.type(full).decode()
        return None if kind == "none" else {"key": full, "type": kind}
    ttl_ms = target.client.pttl(full)
    out: dict[str, Any] = {"key": full, "type": "string", "bytes": len(raw), "ttl_seconds": ttl_ms / 1000}
    if not full.startswith(f"{target.prefix}:e:"):
        out["value"] = raw.decode(errors="replace")[:200]
        return out
    header, nl, body = raw.partition(b"\n")
    fields = header.split(b"\x1f")
    if not nl or not fields[0].isdigit():
        out["valid"] = False
        out["problem"] = "not in sqlacache's entry format (a lookup deletes it)"
        return out
    generation = int(fields[0])
    deps: list[dict[str, Any]] = []
    valid = True
    for dep in (f.decode(errors="replace") for f in fields[1:]):
        version = target.client.get(f"{target.prefix}:v:{dep}")
        digits = version.split(b"|", 1)[0] if version else b""
        number = int(digits) if digits.isdigit() else None
        fresh = number is not None and number <= generation
        valid = valid and fresh
        deps.append({"dependency": dep, "version": number, "ok": fresh})
    out.update(generation=generation, valid=valid, dependencies=deps)
    if len(body) >= _ENVELOPE.size and body[:2] == _MAGIC:
        refresh_at = _ENVELOPE.unpack_from(body)[1]
        out["refresh_at_ms"] = refresh_at or None
        out["payload"] = _preview(body[_ENVELOPE.size :])
    else:
        out["valid"] = False
        out["problem"] = "no sqlacache envelope (foreign or damaged: a lookup deletes it)"
    return out


def run_inspect(target: Target, key: str, as_json: bool) -> int:
    found = describe(target, key)
    if found is None:
        raise Failed(f"no key {_entry_key(target, key)!r} (expired, evicted, or another prefix?)", PROBLEMS)
    if as_json:
        print(json.dumps(found, indent=2))
        return OK
    size, ttl = found.get("bytes", "?"), found.get("ttl_seconds", "?")
    print(f"{found['key']}  ({found['type']}, {size} bytes, ttl {ttl} s)")
    if "generation" in found:
        state = "VALID" if found["valid"] else "OUTDATED (a miss)"
        print(f"  stored at generation {found['generation']}: {state}")
        for dep in found["dependencies"]:
            version = dep["version"] if dep["version"] is not None else "missing"
            print(f"  {'ok ' if dep['ok'] else 'NEW'}  {dep['dependency']}  version {version}")
    for name in ("problem", "payload", "value"):
        if name in found:
            print(f"  {name}: {found[name]}")
    return OK
