"""Redis backend: entries and dependency versions in Redis, every check-and-set in one Lua script.

Key layout (``P`` is the prefix)::

    P:e:<key>   an entry:  b"<generation>\\x1f<dep1>\\x1f<dep2>...\\n" + payload   (PX = entry ttl)
    P:v:<dep>   a dependency version: the decimal generation of its last bump  (PX >= its entries')
    P:gen       the generation counter (no TTL)
    P:l:<key>   a lease: the token of the process filling a missing entry  (PX = the lease's time)
    P:r:<key>   a refresh-ahead claim: one process refreshes a due entry  (PX = its time)

Generations are microseconds on the Redis clock, pushed forward by one on every bump when bumps come
faster than the clock. If ``P:gen`` is lost (eviction, ``clear``) the counter resumes from the clock,
so generations keep increasing without any state surviving; a missing version is likewise treated
as "bumped just now". Losing any key can therefore only cause misses, never a stale hit.

Requires Redis >= 6.0 (``SET ... KEEPTTL``) and a client with ``decode_responses=False``.

The scripts touch keys that are not declared in ``KEYS`` (the versions and the counter). That is
fine on a standalone server or a replicated primary; Redis Cluster would need every key of a prefix
in one hash slot (a ``{...}`` hash tag in the prefix) and the keys declared.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript, Script
from redis.exceptions import RedisError
from redis.retry import Retry

from sqlacache._greenlet import await_ as _await
from sqlacache._greenlet import in_greenlet as _in_greenlet
from sqlacache.backends.base import BackendError, BackendUnavailable, Entry, Lookup

__all__ = ["RedisBackend"]

_T = TypeVar("_T")

# Failures of the client or the server. RuntimeError is here because an asyncio client used from an
# event loop other than the one it connected on fails with one ("attached to a different loop").
_FAILURES: tuple[type[BaseException], ...] = (
    RedisError,
    OSError,
    asyncio.TimeoutError,
    TimeoutError,
    RuntimeError,
)

# The server could not be reached or cannot serve yet (LOADING is a ConnectionError in redis-py).
_UNREACHABLE: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    asyncio.TimeoutError,
    TimeoutError,
)


_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (redis.exceptions.BusyLoadingError, "loading"),
    (redis.exceptions.TimeoutError, "timeout"),
    (asyncio.TimeoutError, "timeout"),
    (TimeoutError, "timeout"),
    (redis.exceptions.ConnectionError, "connection"),
    (OSError, "connection"),
    (redis.exceptions.OutOfMemoryError, "oom"),
    (redis.exceptions.ReadOnlyError, "readonly"),
    (redis.exceptions.NoScriptError, "noscript"),
    (redis.exceptions.ResponseError, "server"),
)


def _failure(what: str, exc: BaseException) -> BackendError:
    kind = next((name for cls, name in _KINDS if isinstance(exc, cls)), "error")
    if kind == "server" and "OOM" in str(exc):  # raised inside a script: a plain ResponseError
        kind = "oom"
    elif kind == "server" and "READONLY" in str(exc):
        kind = "readonly"
    error = BackendUnavailable if isinstance(exc, _UNREACHABLE) else BackendError
    # str(), not repr(): redis-py's repr hides the server's own message ("server:ResponseError").
    return error(f"Redis {what} failed: {type(exc).__name__}: {exc}", kind)


_DEFAULT_VERSION_TTL = 7 * 86400.0
# Longer TTLs are clamped: Redis rejects expiry times that overflow its millisecond clock.
_MAX_TTL_MS = 100 * 365 * 86400 * 1000

# Shared by every script. Values are parsed strictly (digits only) so that a foreign or damaged value
# reads as missing instead of raising inside the script. Numbers are written back with
# string.format('%d'): Lua would format a microsecond generation as 1.7e+15.
_PRELUDE = r"""
local function get(key)
  local value = redis.pcall('GET', key)
  if type(value) == 'table' and value.err then
    return nil, true
  end
  if not value then
    return nil, false
  end
  return value, false
end

-- A version is digits; a table's scheme registry ("v:s:<table>") is digits then "|scheme|scheme…".
local function num(value)
  if value then
    local digits = string.match(value, '^(%d+)$') or string.match(value, '^(%d+)|')
    if digits then
      return tonumber(digits)
    end
  end
  return nil
end

-- Give a version a new value. A missing row or condition version stays missing: nothing valid
-- depends on it, and not creating it keeps metadata proportional to what is cached, not to what
-- is written. A table's own version is created (there are few), so that the table's other
-- missing versions can start from it (see the store script's floor).
local function bump_version(key, g, create_ttl)
  local value = get(key)
  if not value then
    if create_ttl then
      redis.call('SET', key, g, 'PX', create_ttl)
    end
    return
  end
  local schemes = string.match(value, '^%d+(|.*)$') or ''
  redis.call('SET', key, g .. schemes, 'KEEPTTL')
end

local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function current_generation(prefix)
  local value = get(prefix .. ':gen')
  if num(value) then
    return value
  end
  return string.format('%d', clock())
end

local function next_generation(prefix)
  local key = prefix .. ':gen'
  local g = (num((get(key))) or 0) + 1
  local now = clock()
  if g <= now then
    g = now + 1
  end
  local s = string.format('%d', g)
  redis.call('SET', key, s)
  return g, s
end
"""

# KEYS[1] entry key; ARGV[1] prefix.
# Returns {0, gen} for a miss, {2, gen} for a corrupt entry (deleted), {1, gen, value} for a hit.
# KEYS[1] entry key, KEYS[2] (optional) its lease; ARGV[1] prefix, ARGV[2] lease token, ARGV[3]
# lease ms. Returns {0, gen} for a miss, {2, gen} for a corrupt entry (deleted), {1, gen, value}
# for a hit; with a lease key, a miss also tries to take the lease: {0|2, gen, 1 taken | 0 held}.
_LOOKUP = (
    _PRELUDE
    + r"""
local prefix = ARGV[1]
local function miss(status)
  local reply = {status, current_generation(prefix)}
  if KEYS[2] then
    reply[3] = redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) and 1 or 0
  end
  return reply
end
local raw, wrong_type = get(KEYS[1])
if wrong_type then
  redis.call('DEL', KEYS[1])
  return miss(2)
end
if not raw then
  return miss(0)
end
local nl = string.find(raw, '\n', 1, true)
if not nl then
  redis.call('DEL', KEYS[1])
  return miss(2)
end
local header = string.sub(raw, 1, nl - 1)
local fields = {}
local pos = 1
while true do
  local sep = string.find(header, '\31', pos, true)
  if not sep then
    fields[#fields + 1] = string.sub(header, pos)
    break
  end
  fields[#fields + 1] = string.sub(header, pos, sep - 1)
  pos = sep + 1
end
local generation = num(fields[1])
if not generation then
  redis.call('DEL', KEYS[1])
  return miss(2)
end
for i = 2, #fields do
  local version = num((get(prefix .. ':v:' .. fields[i])))
  if not version or version > generation then
    redis.call('DEL', KEYS[1])
    return miss(0)
  end
end
return {1, current_generation(prefix), raw}
"""
)

# ARGV[1] prefix. Returns the current generation as a decimal string.
_GENERATION = (
    _PRELUDE
    + r"""
return current_generation(ARGV[1])
"""
)

# KEYS[1] entry key, KEYS[2] (optional) the filler's lease; ARGV[1] prefix, ARGV[2] reader's
# generation, ARGV[3] entry ttl ms, ARGV[4] entry value, ARGV[5] version ttl ms, ARGV[6] the lease's
# token (released if still ours, stored or not), ARGV[7..] deps. Returns 1 if stored, 0 if refused.
_STORE = (
    _PRELUDE
    + r"""
local prefix = ARGV[1]
local generation = num(ARGV[2])
local ttl = tonumber(ARGV[3])
local vttl = ARGV[5]
if KEYS[2] and redis.call('GET', KEYS[2]) == ARGV[6] then
  redis.call('DEL', KEYS[2])
end
local accepted = generation ~= nil
local fresh = nil
local function now()
  if not fresh then
    local _, s = next_generation(prefix)
    fresh = s
  end
  return fresh
end
-- Where a missing version of <table> (row, condition, registry, all rows) may start: at the
-- table's own version, which every write to the table moves (it exists only while it is at least
-- as new as the table's last write). Nil when that is missing or newer than this reader: then
-- the missing version counts as "bumped now".
local function floor(tbl)
  if not generation then
    return nil
  end
  local tkey = prefix .. ':v:t:' .. tbl
  local value = get(tkey)
  local n = num(value)
  if not n then
    -- Lost (or never written): create it as "bumped now", so that the next readers have a floor.
    redis.call('SET', tkey, now(), 'PX', vttl)
    return nil
  end
  if n > generation then
    return nil
  end
  local pttl = redis.call('PTTL', tkey)
  if pttl >= 0 and pttl < tonumber(vttl) then
    redis.call('PEXPIRE', tkey, vttl)
  end
  return string.format('%d', n)
end
-- A condition dependency "c:<table>:<columns>:<tokens>" is only bumped by writers that find its
-- scheme (<columns>) in the table's registry, so the registry's version (every condition entry
-- of the table depends on it) must start no older than the last write that may not have known it.
for i = 7, #ARGV do
  local tbl, scheme = string.match(ARGV[i], '^c:([^:]*):([^:]*):')
  if tbl then
    local rkey = prefix .. ':v:s:' .. tbl
    local value = get(rkey)
    local current = num(value)
    if not (current and string.find(value .. '|', '|' .. scheme .. '|', 1, true)) then
      local start = floor(tbl)
      if not start then
        start = now()
        accepted = false
      end
      if current then
        if current > tonumber(start) then
          start = string.format('%d', current)
        end
        local schemes = string.match(value, '^%d+(|.*)$') or ''
        redis.call('SET', rkey, start .. schemes .. '|' .. scheme, 'KEEPTTL')
      else
        redis.call('SET', rkey, start .. '|' .. scheme, 'PX', vttl)
      end
    end
  end
end
for i = 7, #ARGV do
  local dep = ARGV[i]
  local key = prefix .. ':v:' .. dep
  local version = num((get(key)))
  if not version then
    local tbl = string.match(dep, '^[cr]:([^:]*):') or string.match(dep, '^[as]:([^:]*)$')
    local start = tbl and floor(tbl)
    if start then
      redis.call('SET', key, start, 'PX', vttl)
    else
      -- A lost version counts as bumped now: refuse, and create it so that the next reader can store.
      redis.call('SET', key, now(), 'PX', vttl)
      accepted = false
    end
  elseif not accepted or version > generation then
    accepted = false
  end
end
if not accepted then
  return 0
end
redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[3])
for i = 7, #ARGV do
  local key = prefix .. ':v:' .. ARGV[i]
  local pttl = redis.call('PTTL', key)
  -- -1: no expiry, keep it that way. Otherwise outlive the entry, never shorten.
  if pttl >= 0 and pttl < ttl then
    redis.call('PEXPIRE', key, ARGV[3])
  end
end
return 1
"""
)

# ARGV[1] prefix, ARGV[2] version ttl ms, ARGV[3] number of deps n, ARGV[4..n+3] deps, then row
# images, each "<table>\x1f<guard or ->\x1f<column>\x1f<token>…". Returns the new generation.
# Each image bumps, for every scheme registered for its table, the condition dependency its values
# name — or the whole registry (every condition entry of the table) when it lacks a column.
_BUMP = (
    _PRELUDE
    + r"""
local prefix = ARGV[1]
local vttl = ARGV[2]
local ndeps = tonumber(ARGV[3])
-- Under maxmemory with noeviction, writes fail but deletes don't: a deleted version reads as
-- "bumped now" everywhere, so an invalidation still gets through (coarser: whole tables).
local key = prefix .. ':gen'
local g = (num((get(key))) or 0) + 1
local now = clock()
if g <= now then
  g = now + 1
end
g = string.format('%d', g)
local full = redis.pcall('SET', key, g)
local evict = type(full) == 'table' and full.err ~= nil
local done = {}
local function bump(dep)
  if not done[dep] then
    done[dep] = true
    if evict then
      redis.call('DEL', prefix .. ':v:' .. dep)
    else
      bump_version(prefix .. ':v:' .. dep, g, string.sub(dep, 1, 2) == 't:' and vttl)
    end
  end
end
-- Parse the images and check their guards first: a guarded image holds values an object was
-- loaded with, current only if its table had no committed write since (before this bump moves
-- the table's own version).
local images = {}
for i = 4 + ndeps, #ARGV do
  local fields = {}
  for f in string.gmatch(ARGV[i], '[^\31]+') do
    fields[#fields + 1] = f
  end
  local values = {}
  for j = 3, #fields - 1, 2 do
    values[fields[j]] = fields[j + 1]
  end
  local trusted = not evict
  if trusted and fields[2] ~= '-' then
    local current = num((get(prefix .. ':v:t:' .. fields[1])))
    trusted = current ~= nil and current <= tonumber(fields[2])
  end
  images[#images + 1] = {fields[1], values, trusted}
end
for i = 4, 3 + ndeps do
  bump(ARGV[i])
end
local registries = {}
for _, image in ipairs(images) do
  local tbl = image[1]
  local values = image[2]
  if not image[3] then
    values = {}
  end
  if evict then
    bump('t:' .. tbl)
    bump('s:' .. tbl)
  end
  local schemes = evict and {} or registries[tbl]
  if not schemes then
    schemes = {}
    local value = get(prefix .. ':v:s:' .. tbl)
    if value then
      for scheme in string.gmatch(value, '|([^|]+)') do
        schemes[#schemes + 1] = scheme
      end
    end
    registries[tbl] = schemes
  end
  for _, scheme in ipairs(schemes) do
    local tokens = {}
    local known = true
    for column in string.gmatch(scheme, '[^,]+') do
      local t = values[column]
      if not t then
        known = false
        break
      end
      tokens[#tokens + 1] = t
    end
    if known then
      bump('c:' .. tbl .. ':' .. scheme .. ':' .. table.concat(tokens, ','))
    else
      bump('s:' .. tbl)
    end
  end
end
return g
"""
)

# KEYS[1] a lease; ARGV[1] its holder's token.
_RELEASE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_GLOB_SPECIAL = frozenset("\\*?[]")


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def _ttl_ms(seconds: float) -> int:
    if not math.isfinite(seconds):
        return _MAX_TTL_MS
    return max(1, min(_MAX_TTL_MS, math.ceil(seconds * 1000)))


def _decodes_responses(client: Any) -> bool:
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    return bool(kwargs.get("decode_responses")) if isinstance(kwargs, dict) else False


class _Side:
    """One client with its registered scripts, and how to get a result out of its calls."""

    __slots__ = ("bump", "client", "generation", "lookup", "release", "resolve", "store")

    def __init__(self, client: redis.Redis | redis.asyncio.Redis, resolve: Callable[[Any], Any]) -> None:
        self.client: Any = client
        # Sync clients return results, asyncio clients coroutines; resolve turns either into a result.
        self.resolve = resolve
        self.lookup: Script | AsyncScript = client.register_script(_LOOKUP)
        self.generation: Script | AsyncScript = client.register_script(_GENERATION)
        self.store: Script | AsyncScript = client.register_script(_STORE)
        self.bump: Script | AsyncScript = client.register_script(_BUMP)
        self.release: Script | AsyncScript = client.register_script(_RELEASE)


def _identity(value: _T) -> _T:
    return value


class RedisBackend:
    """A :class:`~sqlacache.backends.base.Backend` on Redis (redis-py sync and/or asyncio clients).

    With both clients, calls made inside SQLAlchemy's greenlet (the sync core of an ``AsyncSession``)
    await the asyncio client without blocking the event loop, and all other calls use the sync
    client. An asyncio client is bound to the event loop it first connected on: use one backend per
    event loop.

    Clients passed in are not closed by :meth:`close` (their owner closes them); clients built by
    :meth:`from_url` are.

    ``Lookup.generation`` is always the current generation, on a hit as on a miss (the lookup script
    reads it in the same round trip).

    ``corrupt_entries`` counts stored values found in a format this backend cannot read (they are
    deleted and reported as misses).
    """

    def __init__(
        self,
        client: redis.Redis | None = None,
        *,
        async_client: redis.asyncio.Redis | None = None,
        prefix: str = "sqlacache",
        version_ttl: float = _DEFAULT_VERSION_TTL,
    ) -> None:
        if client is None and async_client is None:
            raise ValueError("RedisBackend needs a client, an async_client, or both")
        for c in (client, async_client):
            if c is not None and _decodes_responses(c):
                raise ValueError(
                    "RedisBackend needs a client with decode_responses=False (payloads are bytes)"
                )
        if not prefix:
            raise ValueError("prefix must not be empty")
        if not version_ttl > 0:
            raise ValueError("version_ttl must be positive")
        self.prefix = prefix
        self.corrupt_entries = 0
        self._version_ttl_ms = str(_ttl_ms(version_ttl))
        self._sync = _Side(client, _identity) if client is not None else None
        self._async = _Side(async_client, _await) if async_client is not None else None
        self._async_factory: Callable[[], redis.asyncio.Redis] | None = None
        self._owns_clients = False
        self._closed = False
        self._lock = threading.Lock()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "sqlacache",
        version_ttl: float = _DEFAULT_VERSION_TTL,
        socket_timeout: float = 0.05,
        socket_connect_timeout: float = 0.05,
        **client_kwargs: Any,
    ) -> RedisBackend:
        """Build a sync client now and an asyncio client on first use inside an ``AsyncSession``.

        The short default timeouts are deliberate: a slow cache must fall back to the database fast.
        Unless ``client_kwargs`` has a ``retry``, a failed command is retried once without backoff
        (a pooled connection the server has closed is the common case); a ``retry`` given there must
        work for both the sync and the asyncio client.
        """
        kwargs: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            **client_kwargs,
        }
        sync_kwargs = dict(kwargs)
        async_kwargs = dict(kwargs)
        if "retry" not in kwargs:
            # Retry a dropped connection once (the server closed an idle one), never a timeout: a
            # server that does not answer would cost two timeouts per call.
            dropped = (redis.exceptions.ConnectionError,)
            sync_kwargs["retry"] = Retry(NoBackoff(), 1, supported_errors=dropped)
            async_kwargs["retry"] = AsyncRetry(NoBackoff(), 1, supported_errors=dropped)
        backend = cls(redis.Redis.from_url(url, **sync_kwargs), prefix=prefix, version_ttl=version_ttl)
        backend._async_factory = lambda: redis.asyncio.Redis.from_url(url, **async_kwargs)
        backend._owns_clients = True
        return backend

    @property
    def client(self) -> redis.Redis | None:
        """The sync client, if there is one."""
        return self._sync.client if self._sync is not None else None

    @property
    def sync_capable(self) -> bool:
        """Whether any thread may call it (a backend with only an asyncio client needs its loop)."""
        return self._sync is not None

    # -- dispatch -----------------------------------------------------------------------------------

    def _side(self) -> _Side:
        if self._closed:
            raise BackendError("RedisBackend is closed")
        if (self._async is not None or self._async_factory is not None) and _in_greenlet():
            if self._async is None:
                with self._lock:
                    if self._async is None and self._async_factory is not None:
                        self._async = _Side(self._async_factory(), _await)
            if self._async is not None:
                return self._async
        if self._sync is not None:
            return self._sync
        raise BackendError(
            "RedisBackend has only an asyncio client and was called outside an AsyncSession "
            "(no SQLAlchemy greenlet to await in); pass a sync client too "
            "(RedisBackend(client=..., async_client=...) or RedisBackend.from_url(...)), "
            "or use it only from async sessions"
        )

    def _run(self, what: str, op: Callable[[_Side], Any]) -> Any:
        side = self._side()
        try:
            return side.resolve(op(side))
        except _FAILURES as exc:
            raise _failure(what, exc) from exc

    def _entry_key(self, key: str) -> str:
        return f"{self.prefix}:e:{key}"

    def _count_corrupt(self) -> None:
        with self._lock:
            self.corrupt_entries += 1

    @staticmethod
    def _int(value: Any, what: str) -> int:
        try:
            return int(value)
        except (TypeError, ValueError) as exc:
            raise BackendError(f"Redis returned a malformed {what}: {value!r}", "protocol") from exc

    # -- the contract -------------------------------------------------------------------------------

    def lookup(self, key: str, hint: Sequence[str] = ()) -> Lookup:
        found: Lookup = self._drive("lookup", self._lookup_steps(key, hint))[0]
        return found

    def _drive(self, what: str, steps: Generator[Callable[[_Side], Any], Any, _T]) -> _T:
        """Run a sequence of commands on the side this thread (or greenlet) should use."""
        side = self._side()
        op = next(steps)
        while True:
            try:
                reply = side.resolve(op(side))
            except _FAILURES as exc:
                raise _failure(what, exc) from exc
            try:
                op = steps.send(reply)
            except StopIteration as done:
                result: _T = done.value
                return result

    async def alookup(self, key: str, hint: Sequence[str] = ()) -> Lookup:
        """``lookup`` awaited on the event loop with the asyncio client (no greenlet needed)."""
        side = self._async_side()
        if side is None:
            return self.lookup(key, hint)
        steps = self._lookup_steps(key, hint)
        op = next(steps)
        while True:
            try:
                reply = await op(side)
            except _FAILURES as exc:
                raise _failure("lookup", exc) from exc
            try:
                op = steps.send(reply)
            except StopIteration as done:
                found: Lookup = done.value[0]
                return found

    def _async_side(self) -> _Side | None:
        if self._closed:
            raise BackendError("RedisBackend is closed")
        if self._async is None and self._async_factory is not None:
            with self._lock:
                if self._async is None:
                    self._async = _Side(self._async_factory(), _await)
        return self._async

    def _lookup_steps(
        self, key: str, hint: Sequence[str], lease: tuple[str, int] | None = None
    ) -> Generator[Callable[[_Side], Any], Any, tuple[Lookup, bool]]:
        """The lookup as a sequence of commands, so sync and async callers share one implementation.

        With ``lease`` (token, ms), a miss also tries to take the key's lease: (lookup, taken)."""
        entry_key = self._entry_key(key)
        if hint and lease is None:
            keys = [entry_key, f"{self.prefix}:gen", *(f"{self.prefix}:v:{d}" for d in hint)]
            answer = self._hinted_answer((yield lambda s: s.client.mget(keys)), hint, len(keys))
            if answer is not None:
                return answer, False
        if lease is None:
            reply = yield lambda s: s.lookup(keys=[entry_key], args=[self.prefix])
        else:
            keys = [entry_key, self._lease_key(key)]
            reply = yield lambda s: s.lookup(keys=keys, args=[self.prefix, lease[0], lease[1]])
        if not isinstance(reply, list) or len(reply) < 2:
            raise BackendError(f"Redis lookup returned a malformed reply: {reply!r}", "protocol")
        status = reply[0]
        generation = self._int(reply[1], "generation")
        if status == 1 and len(reply) == 3 and isinstance(reply[2], bytes):
            entry = self._parse(reply[2])
            if entry is not None:
                return Lookup(entry, generation), False
            # The script accepted the header but its dependency names are not UTF-8: not ours.
            yield lambda s: s.client.delete(entry_key)
            self._count_corrupt()
            return Lookup(None, generation), False
        taken = len(reply) == 3 and reply[2] == 1
        if status == 2:
            self._count_corrupt()
            return Lookup(None, generation), taken
        if status == 0:
            return Lookup(None, generation), taken
        raise BackendError(f"Redis lookup returned a malformed reply: {reply!r}", "protocol")

    @staticmethod
    def _hinted_answer(reply: Any, hint: Sequence[str], expected: int) -> Lookup | None:
        """Check an MGET of the entry, the generation and the hinted versions.

        MGET reads all its keys atomically, so this is the script's check on the same snapshot —
        at a fraction of the server time. None when the answer needs the script: the entry names a
        dependency outside the hint, or something is missing or malformed.
        """
        if not isinstance(reply, list) or len(reply) != expected or reply[1] is None:
            return None
        try:
            current = int(reply[1])
        except (TypeError, ValueError):
            return None
        raw = reply[0]
        if raw is None:
            return Lookup(None, current)
        header, sep, payload = raw.partition(b"\n")
        fields = header.split(b"\x1f")
        try:
            stored_at = int(fields[0])
            deps = tuple(f.decode() for f in fields[1:])
        except (ValueError, UnicodeDecodeError):
            return None
        if not sep:
            return None
        versions = dict(zip(hint, reply[2:]))
        for dep in deps:
            if dep not in versions:
                return None
            version = versions[dep]
            try:
                if version is None or int(version.partition(b"|")[0]) > stored_at:
                    return Lookup(None, current)  # stale: the store that follows replaces it
            except ValueError:
                return None
        return Lookup(Entry(payload, deps), current)

    @staticmethod
    def _parse(raw: bytes) -> Entry | None:
        header, _, payload = raw.partition(b"\n")
        fields = header.split(b"\x1f")
        try:
            deps = tuple(field.decode() for field in fields[1:])
        except UnicodeDecodeError:
            return None
        return Entry(payload, deps)

    def generation(self) -> int:
        reply = self._run("generation", lambda s: s.generation(args=[self.prefix]))
        return self._int(reply, "generation")

    def _store_call(
        self, key: str, payload: bytes, deps: Sequence[str], generation: int, ttl: float, lease: str | None
    ) -> tuple[list[str], list[str | bytes]] | None:
        """The store script's keys and arguments; None when there is nothing to store."""
        header_deps = []
        for dep in deps:
            if "\x1f" in dep or "\n" in dep:
                raise ValueError(f"dependency name {dep!r} contains a separator character (\\x1f or \\n)")
            header_deps.append(dep.encode())
        if not ttl > 0:  # also rejects NaN
            return None
        value = b"\x1f".join([str(int(generation)).encode(), *header_deps]) + b"\n" + bytes(payload)
        keys = [self._entry_key(key)]
        if lease is not None:
            keys.append(self._lease_key(key))
        args: list[str | bytes] = [
            self.prefix,
            str(int(generation)),
            str(_ttl_ms(ttl)),
            value,
            self._version_ttl_ms,
            lease or "",
            *deps,
        ]
        return keys, args

    def store(
        self,
        key: str,
        payload: bytes,
        deps: Sequence[str],
        generation: int,
        ttl: float,
        *,
        lease: str | None = None,
    ) -> bool:
        """See the contract; ``lease`` (a token from :meth:`lease`) is released in the same step."""
        call = self._store_call(key, payload, deps, generation, ttl, lease)
        if call is None:
            if lease is not None:
                self.release(key, lease)
            return False
        keys, args = call
        reply = self._run("store", lambda s: s.store(keys=keys, args=args))
        return self._int(reply, "store reply") == 1

    async def astore(
        self,
        key: str,
        payload: bytes,
        deps: Sequence[str],
        generation: int,
        ttl: float,
        *,
        lease: str | None = None,
    ) -> bool:
        """``store`` awaited on the event loop with the asyncio client."""
        side = self._async_side()
        if side is None:
            return self.store(key, payload, deps, generation, ttl, lease=lease)
        call = self._store_call(key, payload, deps, generation, ttl, lease)
        if call is None:
            return False
        keys, args = call
        try:
            reply = await side.store(keys=keys, args=args)
        except _FAILURES as exc:
            raise _failure("store", exc) from exc
        return self._int(reply, "store reply") == 1

    # -- leases: one process fills a missing key while the others wait a bounded time -------------

    def _lease_key(self, key: str) -> str:
        return f"{self.prefix}:l:{key}"

    def lease(self, key: str, ttl: float) -> tuple[Lookup, str | bool | None]:
        """Look ``key`` up and, if it is missing, take the lease to fill it for ``ttl`` seconds, in
        one step: (lookup, its token) — or (lookup, False) if another process holds the lease, or
        (a hit, None).

        A holder that dies releases nothing; the lease expires after ``ttl`` on its own.
        """
        token = secrets.token_hex(8)
        found, taken = self._drive("lease", self._lookup_steps(key, (), (token, _ttl_ms(ttl))))
        if found.entry is not None:
            return found, None
        return found, token if taken else False

    def claim(self, key: str, ttl: float) -> str | None:
        """Claim the refresh of ``key`` for ``ttl`` seconds (refresh-ahead; apart from the fill
        lease, so that a miss after a refresh doesn't wait for it): a token, or None."""
        token = secrets.token_hex(8)
        claim_key = f"{self.prefix}:r:{key}"
        taken = self._run("claim", lambda s: s.client.set(claim_key, token, nx=True, px=_ttl_ms(ttl)))
        return token if taken else None

    def release(self, key: str, token: str) -> None:
        """Give a lease back (only if it is still ours: it may have expired and been taken since)."""
        lease_key = self._lease_key(key)
        self._run("release", lambda s: s.release(keys=[lease_key], args=[token]))

    def bump(
        self, deps: Sequence[str], rows: Sequence[tuple[str, Mapping[str, str], int | None]] = ()
    ) -> None:
        if not deps and not rows:
            return
        args = [self.prefix, self._version_ttl_ms, str(len(deps)), *deps]
        for table, values, guard in rows:
            head = [table, "-" if guard is None else str(int(guard))]
            args.append("\x1f".join([*head, *(x for item in values.items() for x in item)]))
        self._run("bump", lambda s: s.bump(args=args))

    def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        entry_keys = [self._entry_key(k) for k in keys]
        self._run("delete", lambda s: s.client.unlink(*entry_keys))

    def clear(self) -> None:
        # SCAN + UNLINK in batches from the client, not one script: a script over a large keyspace
        # would block Redis for everyone, and a blocked cache is an outage.
        side = self._side()
        pattern = _glob_escape(self.prefix) + ":*"
        ours = self.prefix.encode() + b":"
        try:
            cursor: int = 0
            while True:
                cursor, keys = side.resolve(side.client.scan(cursor=cursor, match=pattern, count=1000))
                # Only this backend's key shapes: prefix "app" must not wipe prefix "app:x"'s keys.
                doomed = [k for k in keys if self._is_ours(k, ours)]
                if doomed:
                    side.resolve(side.client.unlink(*doomed))
                if int(cursor) == 0:
                    break
        except _FAILURES as exc:
            raise _failure("clear", exc) from exc

    @staticmethod
    def _is_ours(key: bytes, ours: bytes) -> bool:
        if not key.startswith(ours):
            return False
        rest = key[len(ours) :]
        return rest.startswith((b"e:", b"v:", b"l:", b"r:")) or rest == b"gen"

    def close(self) -> None:
        """Close the clients this backend built (see :meth:`from_url`); further calls fail.

        Called inside an ``AsyncSession``'s greenlet, the asyncio client is closed too; elsewhere its
        connections are left to be released with it (an asyncio client can only be closed on its
        event loop): from async code prefer :meth:`aclose`.
        """
        self._closed = True
        if not self._owns_clients:
            return
        try:
            if self._sync is not None:
                self._sync.client.close()
            if self._async is not None and _in_greenlet():
                client, self._async = self._async.client, None
                _await(client.aclose())
        except _FAILURES as exc:
            raise _failure("close", exc) from exc

    async def aclose(self) -> None:
        """Like :meth:`close`, from async code on the event loop the asyncio client is bound to."""
        self._closed = True
        if not self._owns_clients:
            return
        try:
            if self._sync is not None:
                self._sync.client.close()
            if self._async is not None:
                client, self._async = self._async.client, None
                await client.aclose()
        except _FAILURES as exc:
            raise _failure("close", exc) from exc
