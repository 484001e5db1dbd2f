"""The Redis backend: its clients and the contract's calls; each check-and-set is one script (scripts.py)."""

from __future__ import annotations

import asyncio
import codecs
import math
import threading
import weakref
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript, Script
from redis.retry import Retry

from sqlacache._sa import await_ as _await
from sqlacache._sa import in_greenlet as _in_greenlet
from sqlacache.backends.base import BackendError, Entry, Listener, Lookup, Position
from sqlacache.backends.redis import leases, scripts
from sqlacache.backends.redis import sentinel as sentinel_url
from sqlacache.backends.redis.errors import FAILURES, failure
from sqlacache.backends.redis.fanout import Subscriber, parse_position
from sqlacache.backends.redis.identity import ServerWatch
from sqlacache.backends.redis.own import AsyncConnections, AsyncOwnScript, OwnScript, Sender, can_own
from sqlacache.backends.redis.signing import FanoutKeys, Verifier, count_arg, signing_keys

__all__ = ["RedisBackend"]

_T = TypeVar("_T")

_DEFAULT_VERSION_TTL = 7 * 86400.0
# Longer TTLs are clamped: Redis rejects expiry times that overflow its millisecond clock.
_MAX_TTL_MS = 100 * 365 * 86400 * 1000


_GLOB_SPECIAL = frozenset("\\*?[]")


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def _ttl_ms(seconds: float) -> int:
    if not math.isfinite(seconds):
        return _MAX_TTL_MS
    return max(1, min(_MAX_TTL_MS, math.ceil(seconds * 1000)))


def _unfit_client(client: Any) -> str | None:
    """Why ``client`` can't carry our keys and payloads, or None."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return None
    if kwargs.get("decode_responses"):
        return "RedisBackend needs a client with decode_responses=False (payloads are bytes)"
    encoding = kwargs.get("encoding", "utf-8")
    try:
        utf8 = codecs.lookup(encoding).name == "utf-8"
    except (LookupError, TypeError):
        utf8 = False
    if not utf8:
        # Entries name their dependencies in UTF-8, and the scripts read those names as keys.
        return f"RedisBackend needs a client with encoding='utf-8' (the default), not {encoding!r}"
    return None


class _Side:
    """One client with its registered scripts, and how to get a result out of its calls."""

    __slots__ = ("bump", "client", "generation", "lookup", "release", "resolve", "store")

    def __init__(self, client: redis.Redis | redis.asyncio.Redis, resolve: Callable[[Any], Any]) -> None:
        self.client: Any = client
        # Sync clients return results, asyncio clients coroutines; resolve turns either into a result.
        self.resolve = resolve
        self.lookup: Script | AsyncScript | OwnScript | AsyncOwnScript
        self.lookup = client.register_script(scripts.LOOKUP)
        self.generation: Script | AsyncScript = client.register_script(scripts.GENERATION)
        self.store: Script | AsyncScript | AsyncOwnScript = client.register_script(scripts.STORE)
        self.bump: Script | AsyncScript = client.register_script(scripts.BUMP)
        self.release: Script | AsyncScript = client.register_script(scripts.RELEASE)


def _sentinel_managed(client: Any) -> bool:
    """Whether ``client`` reaches its server through Sentinel (``Sentinel.master_for``)."""
    pool = getattr(client, "connection_pool", None)
    return hasattr(pool, "sentinel_manager") and hasattr(pool, "service_name")


def _root(dep: str) -> str:
    """The version a missing ``dep`` starts from (see the contract): its table's ``t:``, or itself."""
    if dep[:2] in ("r:", "c:", "a:", "s:"):
        return "t:" + dep[2:].split(":", 1)[0]
    return dep


def _identity(value: _T) -> _T:
    return value


class RedisBackend:
    """A :class:`~sqlacache.backends.base.Backend` on Redis (redis-py sync and/or asyncio clients).

    With both clients, calls made inside SQLAlchemy's greenlet (the sync core of an ``AsyncSession``)
    await the asyncio client without blocking the event loop, and all other calls use the sync
    client. An asyncio client is bound to the event loop it first connected on: use one backend per
    event loop (called from another loop, a backend with both clients uses the sync one there).

    Clients passed in are not closed by :meth:`close` (their owner closes them); clients built by
    :meth:`from_url` are.

    ``Lookup.generation`` is always the current generation, on a hit as on a miss (the lookup script
    reads it in the same round trip).

    ``corrupt_entries`` counts stored values found in a format this backend cannot read (they are
    deleted and reported as misses).

    ``watch_server``: check, on every connection it opens, that the server is the one the data was
    written on, and invalidate everything when it isn't (identity.py): a failover, a restart with
    older data. None (the default): on for a Sentinel-managed client (``Sentinel.master_for``, a
    ``redis+sentinel://`` URL), off otherwise. ``server_changes`` counts what it found.
    """

    def __init__(
        self,
        client: redis.Redis | None = None,
        *,
        async_client: redis.asyncio.Redis | None = None,
        prefix: str = "sqlacache",
        version_ttl: float = _DEFAULT_VERSION_TTL,
        watch_server: bool | None = None,
    ) -> None:
        if client is None and async_client is None:
            raise ValueError("RedisBackend needs a client, an async_client, or both")
        for c in (client, async_client):
            unfit = _unfit_client(c) if c is not None else None
            if unfit is not None:
                raise ValueError(unfit)
        if not prefix:
            raise ValueError("prefix must not be empty")
        if not version_ttl > 0:
            raise ValueError("version_ttl must be positive")
        self.prefix = prefix
        self.corrupt_entries = 0
        self._fanout_keys: FanoutKeys | None = None  # sign_fanout
        self._version_ttl_ms = str(_ttl_ms(version_ttl))
        if watch_server is None:
            watch_server = any(_sentinel_managed(c) for c in (client, async_client) if c is not None)
        self._watch = ServerWatch(prefix, self._version_ttl_ms) if watch_server else None
        for c in (client, async_client):
            if c is not None and self._watch is not None:
                self._watch.install(c)
        self._sync = _Side(client, _identity) if client is not None else None
        self._sender: Sender | None = None
        if client is not None and self._sync is not None and can_own(client):
            # Stores sent without waiting, and the read path's lookup, on connections of our own.
            self._sender = Sender(client, scripts.STORE)
            self._sync.lookup = OwnScript(client, scripts.LOOKUP, self._sync.lookup.sha, (scripts.STORE,))
        self._own_async: AsyncConnections | None = None
        self._async_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None  # see _async_side
        self._async = self._async_side_of(async_client) if async_client is not None else None
        self._async_factory: Callable[[], redis.asyncio.Redis] | None = None
        self._owns_clients = False
        self._sentinels: list[Any] = []  # Sentinel managers built by from_url (closed with it)
        self._closed = False
        self._lock = threading.Lock()

    @property
    def server_changes(self) -> int:
        """How many times a connection found a server other than the one the data was written on
        (``watch_server``) and invalidated everything."""
        return self._watch.changes if self._watch is not None else 0

    def _new_async_side(self) -> _Side:
        assert self._async_factory is not None
        client = self._async_factory()
        if self._watch is not None:
            self._watch.install(client)
        return self._async_side_of(client)

    def _async_side_of(self, client: redis.asyncio.Redis) -> _Side:
        side = _Side(client, _await)
        if can_own(client):
            # The read path's lookup and a miss's store on connections of our own (own.py).
            self._own_async = AsyncConnections(client)
            side.lookup = AsyncOwnScript(self._own_async, client, scripts.LOOKUP)
            side.store = AsyncOwnScript(self._own_async, client, scripts.STORE)
        return side

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "sqlacache",
        version_ttl: float = _DEFAULT_VERSION_TTL,
        socket_timeout: float = 0.05,
        socket_connect_timeout: float = 0.05,
        watch_server: bool | None = None,
        **client_kwargs: Any,
    ) -> RedisBackend:
        """Build a sync client now and an asyncio client on first use inside an ``AsyncSession``.

        The short default timeouts are deliberate: a slow cache must fall back to the database fast.
        Unless ``client_kwargs`` has a ``retry``, a failed command is retried once without backoff
        (a pooled connection the server has closed is the common case); a ``retry`` given there must
        work for both the sync and the asyncio client.

        ``redis+sentinel://`` and ``rediss+sentinel://`` URLs (sentinel.py) give clients of the
        service's master through its sentinels (``Sentinel(...).master_for(...)``); the sentinels
        are asked with the same timeouts.
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
        if url.partition("://")[0].lower() in sentinel_url.SCHEMES:
            return cls._from_sentinel_url(url, prefix, version_ttl, watch_server, sync_kwargs, async_kwargs)
        backend = cls(
            redis.Redis.from_url(url, **sync_kwargs),
            prefix=prefix,
            version_ttl=version_ttl,
            watch_server=watch_server,
        )
        backend._async_factory = lambda: redis.asyncio.Redis.from_url(url, **async_kwargs)
        backend._owns_clients = True
        return backend

    @classmethod
    def _from_sentinel_url(
        cls,
        url: str,
        prefix: str,
        version_ttl: float,
        watch_server: bool | None,
        sync_kwargs: dict[str, Any],
        async_kwargs: dict[str, Any],
    ) -> RedisBackend:
        spec = sentinel_url.parse(url)

        def sentinel_kwargs(retry: Any) -> dict[str, Any]:
            # The sentinels are asked with the client's timeouts, not retried (the next one is).
            timeouts = {k: v for k, v in sync_kwargs.items() if k.startswith("socket_")}
            return {**timeouts, **spec.sentinel_kwargs, "retry": retry}

        # The URL's options win over the keyword arguments, as in redis-py's from_url.
        manager = redis.sentinel.Sentinel(
            spec.sentinels, sentinel_kwargs=sentinel_kwargs(Retry(NoBackoff(), 0))
        )
        client = manager.master_for(spec.service, **{**sync_kwargs, **spec.master_kwargs})
        backend = cls(client, prefix=prefix, version_ttl=version_ttl, watch_server=watch_server)
        backend._sentinels.append(manager)

        def async_client() -> redis.asyncio.Redis:
            amanager = redis.asyncio.sentinel.Sentinel(
                spec.sentinels, sentinel_kwargs=sentinel_kwargs(AsyncRetry(NoBackoff(), 0))
            )
            backend._sentinels.append(amanager)
            made: redis.asyncio.Redis = amanager.master_for(
                spec.service, **{**async_kwargs, **spec.master_kwargs}
            )
            return made

        backend._async_factory = async_client
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
            side = self._async_side()
            if side is not None:
                return side
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
        except FAILURES as exc:
            raise failure(what, exc) from exc

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
            except FAILURES as exc:
                raise failure(what, exc) from exc
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
            except FAILURES as exc:
                raise failure("lookup", exc) from exc
            try:
                op = steps.send(reply)
            except StopIteration as done:
                found: Lookup = done.value[0]
                return found

    def _async_side(self) -> _Side | None:
        """The asyncio client's side, if there is one and this is its event loop.

        An asyncio client belongs to the loop it first ran on. Called from another loop (a commit
        on one loop evicts through every cache of that database in the process, another loop's
        too), the sync client answers instead, when there is one."""
        if self._closed:
            raise BackendError("RedisBackend is closed")
        if self._async is None and self._async_factory is not None:
            with self._lock:
                if self._async is None:
                    self._async = self._new_async_side()
        if self._async is None or self._sync is None:
            return self._async
        loop = asyncio.get_running_loop()
        bound = self._async_loop() if self._async_loop is not None else None
        if bound is None or bound.is_closed():  # (a loop that ended leaves its successor the client)
            self._async_loop = weakref.ref(loop)
            return self._async
        return self._async if bound is loop else None

    def _lookup_steps(
        self, key: str, hint: Sequence[str], lease: tuple[str, int] | None = None
    ) -> Generator[Callable[[_Side], Any], Any, tuple[Lookup, bool]]:
        """The lookup as a sequence of commands, so sync and async callers share one implementation.

        With ``lease`` (token, ms), a miss also tries to take the key's lease: (lookup, taken)."""
        entry_key = self._entry_key(key)
        if hint and lease is None:
            # The roots a miss must find (see lookup.lua) are read too: a miss is then answered here.
            looked = [*hint, *(r for r in dict.fromkeys(map(_root, hint)) if r not in hint)]
            keys = [entry_key, f"{self.prefix}:gen", *(f"{self.prefix}:v:{d}" for d in looked)]
            answer = self._hinted_answer((yield lambda s: s.client.mget(keys)), looked, len(keys))
            if answer is not None:
                return answer, False
        # The script: on a miss it also makes the hinted dependencies' roots exist (lookup.lua), so
        # that the store that follows a first read is accepted.
        args = [self.prefix, *(lease or ("", "")), self._version_ttl_ms, *hint]
        keys = [entry_key] if lease is None else [entry_key, self._lease_key(key)]
        reply = yield lambda s: s.lookup(keys=keys, args=args)
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
            # A miss: answered here when the roots exist; else the script creates them (lookup.lua).
            roots = set(map(_root, hint))
            ready = all(v is not None for d, v in zip(hint, reply[2:]) if d in roots)
            return Lookup(None, current) if ready else None
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
        except FAILURES as exc:
            raise failure("store", exc) from exc
        return self._int(reply, "store reply") == 1

    # -- stores sent now, answered later (own.py) -------------------------------------------------

    def send_store(
        self,
        key: str,
        payload: bytes,
        deps: Sequence[str],
        generation: int,
        ttl: float,
        *,
        lease: str | None = None,
    ) -> bool:
        """``store`` without waiting for its reply (read by :meth:`store_replies`): False when it
        can't be sent that way (no plain sync client, or called inside an ``AsyncSession``)."""
        sender = self._sender
        if sender is None or self._closed or self._sync is None or _in_greenlet():
            return False
        call = self._store_call(key, payload, deps, generation, ttl, lease)
        if call is None:
            return False
        try:
            sender.send(self._sync.store.sha, call)
        except FAILURES as exc:
            raise failure("store", exc) from exc
        return True

    def store_replies(self) -> list[bool | BackendError]:
        """What the stores sent so far answered, in order: stored, refused, or why it failed."""
        sender, side = self._sender, self._sync
        if sender is None or side is None or not sender.pending:
            return []
        out: list[bool | BackendError] = []
        for reply in sender.replies(lambda call: side.store(keys=call[0], args=call[1])):
            if isinstance(reply, BaseException):
                out.append(failure("store", reply))
                continue
            try:
                out.append(self._int(reply, "store reply") == 1)
            except BackendError as exc:
                out.append(exc)
        return out

    # -- leases: one process fills a missing key while the others wait a bounded time -------------

    def _lease_key(self, key: str) -> str:
        return f"{self.prefix}:l:{key}"

    def lease(self, key: str, ttl: float, hint: Sequence[str] = ()) -> tuple[Lookup, str | bool | None]:
        """Look ``key`` up and, if it is missing, take the lease to fill it for ``ttl`` seconds, in
        one step: (lookup, its token) — or (lookup, False) if another process holds the lease, or
        (a hit, None). ``hint``: the dependencies the reader expects, as for ``lookup``.

        A holder that dies releases nothing; the lease expires after ``ttl`` on its own.
        """
        token = leases.new_token()
        found, taken = self._drive("lease", self._lookup_steps(key, hint, (token, _ttl_ms(ttl))))
        return leases.outcome(found, taken, token)

    async def alease(
        self, key: str, ttl: float, hint: Sequence[str] = ()
    ) -> tuple[Lookup, str | bool | None]:
        """``lease`` awaited on the event loop with the asyncio client."""
        side = self._async_side()
        if side is None:
            return self.lease(key, ttl, hint)
        token = leases.new_token()
        steps = self._lookup_steps(key, hint, (token, _ttl_ms(ttl)))
        op = next(steps)
        while True:
            try:
                reply = await op(side)
            except FAILURES as exc:
                raise failure("lease", exc) from exc
            try:
                op = steps.send(reply)
            except StopIteration as done:
                found, taken = done.value
                break
        return leases.outcome(found, taken, token)

    def claim(self, key: str, ttl: float) -> str | None:
        """Claim the refresh of ``key`` for ``ttl`` seconds (refresh-ahead; apart from the fill
        lease, so that a miss after a refresh doesn't wait for it): a token, or None."""
        token = leases.new_token()
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
        args = [
            self.prefix,
            self._version_ttl_ms,
            count_arg(self._fanout_keys, self.prefix, len(deps)),
            *deps,
        ]
        for table, values, guard in rows:
            head = [table, "-" if guard is None else str(int(guard))]
            args.append("\x1f".join([*head, *(x for item in values.items() for x in item)]))
        self._run("bump", lambda s: s.bump(args=args))

    # -- fan-out: every bump is published (bump.lua); near-caches subscribe (fanout.py) -------------

    def sign_fanout(self, secrets: Sequence[bytes]) -> None:
        """Sign every bump's fan-out message with the first of ``secrets``, and have subscribers
        accept only messages signed with one of them (signing.py). Before ``subscribe``."""
        self._fanout_keys = signing_keys(self._fanout_keys, secrets)
        if self._watch is not None:
            self._watch.fanout_keys = self._fanout_keys

    def subscribe(self, listener: Listener, heartbeat: float) -> Subscriber:
        """A subscriber thread on ``<prefix>:fanout`` driving ``listener``, started: one thread for
        sync and asyncio code alike, on a sync connection like the client's (an asyncio-only
        backend's too)."""
        side = self._sync or self._async
        if side is None:  # only an async client factory (from_url) without a sync client: never
            raise ValueError("RedisBackend has no client to subscribe with")
        subscriber = Subscriber(side.client, self.prefix, listener, heartbeat, Verifier(self._fanout_keys))
        subscriber.start()
        return subscriber

    def position(self) -> Position:
        """Where the sequence of bumps stands (``HMGET <prefix>:seq born n``)."""
        key = f"{self.prefix}:seq"
        own = self._sync.lookup if self._sync is not None else None
        if isinstance(own, OwnScript) and not _in_greenlet():  # a round trip, no pool machinery
            try:
                return self._position(own.command("HMGET", key, "born", "n"))
            except FAILURES as exc:
                raise failure("position", exc) from exc
        return self._position(self._run("position", lambda s: s.client.hmget(key, ["born", "n"])))

    async def aposition(self) -> Position:
        side = self._async_side()
        if side is None:
            return self.position()
        try:
            reply = await side.client.hmget(f"{self.prefix}:seq", ["born", "n"])
        except FAILURES as exc:
            raise failure("position", exc) from exc
        return self._position(reply)

    def _position(self, reply: Any) -> Position:
        position = parse_position(*reply) if isinstance(reply, list) and len(reply) == 2 else None
        if position is None:
            raise BackendError(f"Redis holds a malformed sequence: {reply!r}", "protocol")
        return position

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
        except FAILURES as exc:
            raise failure("clear", exc) from exc

    @staticmethod
    def _is_ours(key: bytes, ours: bytes) -> bool:
        if not key.startswith(ours):
            return False
        rest = key[len(ours) :]
        return rest.startswith((b"e:", b"v:", b"l:", b"r:")) or rest in (b"gen", b"seq")

    def _close_own(self) -> None:
        if self._sender is not None:
            self._sender.close()
        if self._sync is not None and isinstance(self._sync.lookup, OwnScript):
            self._sync.lookup.close()
        if self._own_async is not None:
            if _in_greenlet():
                _await(self._own_async.aclose())
            else:
                self._own_async.forget()

    def close(self) -> None:
        """Close the clients this backend built (see :meth:`from_url`); further calls fail.

        Called inside an ``AsyncSession``'s greenlet, the asyncio client is closed too; elsewhere its
        connections are left to be released with it (an asyncio client can only be closed on its
        event loop): from async code prefer :meth:`aclose`.
        """
        self._closed = True
        self._close_own()
        if not self._owns_clients:
            return
        try:
            if self._sync is not None:
                self._sync.client.close()
            if self._async is not None and _in_greenlet():
                client, self._async = self._async.client, None
                _await(client.aclose())
            for manager in self._sentinels:
                if hasattr(manager, "aclose"):
                    if _in_greenlet():
                        _await(manager.aclose())
                else:
                    manager.close()
        except FAILURES as exc:
            raise failure("close", exc) from exc

    async def aclose(self) -> None:
        """Like :meth:`close`, from async code on the event loop the asyncio client is bound to."""
        self._closed = True
        if self._own_async is not None:
            await self._own_async.aclose()
        self._close_own()
        if not self._owns_clients:
            return
        try:
            if self._sync is not None:
                self._sync.client.close()
            if self._async is not None:
                client, self._async = self._async.client, None
                await client.aclose()
            for manager in self._sentinels:
                await manager.aclose() if hasattr(manager, "aclose") else manager.close()
        except FAILURES as exc:
            raise failure("close", exc) from exc
