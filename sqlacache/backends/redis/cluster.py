"""Redis Cluster backend: the contract on ``redis.cluster.RedisCluster`` (and its asyncio twin),
with a key layout in which every script touches one hash slot.

Key layout (``P`` is the prefix; ``{…}`` is the hash tag that picks the slot)::

    P:{P|t|<table>}:gen        the table group's generation counter (no TTL)
    P:{P|t|<table>}:v:<dep>    versions of the table's deps: t:, r:, c:, a:, s: (with the scheme
                               registry in v:s:<table>, as on one Redis)
    P:{P|s|<i>}:gen, P:{P|s|<i>}:v:<dep>   stripe i of the global deps: ``*``, ``d:<database>``
    P:e:{P|s|<i>}<key>         an entry: b"<gen>,<gen>…\\x1f<dep>\\x1f<dep>…\\n" + payload
    P:l:{P|s|<i>}<key>         its fill lease
    P:r:{P|s|<i>}<key>         a refresh-ahead claim

``i`` is ``crc32(key) % stripes`` (64 by default): an entry lives in the slot of its stripe, next to
that stripe's copy of the global dependencies, which every entry has (``*`` and ``d:<database>``):
a lookup reads the entry and its global versions with one MGET on one node, and the only other
nodes it asks are those of the tables it read. A bump of a global dependency (``invalidate_all``,
SQL sqlacache can't analyse) bumps it in every stripe; a table write bumps one table group.

A *group* is a table (the text of a dependency up to its first ``:`` after the kind) or a stripe.
Writes to different tables bump different groups, on different slots, and no key is written by
every commit. An entry records, for each group its dependencies fall in (in order of
first appearance), the group's generation its reader started from.

**Generations.** Each group counts on its own (microseconds on its node's clock, pushed forward by
one when bumps come faster, as on one Redis). The contract's single ``int`` generation is, here, a
*handle* local to this backend object: it stands for what this process had observed of every
group's counter when the handle was handed out (every reply that carries a group's generation is
an observation: a lookup's, a store's check, a bump's). An observation is a lower bound of the
group's counter from then on, so a bump that comes after a handle was handed out gives its
dependencies versions newer than what the handle records for that group: exactly the property the
contract asks of generations, per group. Handles only grow, and a later handle records no less for
any group, so ``min()`` of two handles (what the cache does with the generation objects were loaded
at) is the more conservative one. A group this process has not observed yet is recorded as 0: a
store depending on it is refused once (the refusal's reply observes it). Handles are therefore
meaningless in another process, which never sees them: generations do not cross processes.

**The store race, closed without a cross-slot transaction.** A store first runs, in every group
its dependencies fall in (one script per group, pipelined over the nodes), the same check as
``store.lua``: every dependency has a version no newer than the reader's generation for that group
(a missing one is created "bumped now", or from its table's floor), and only when every group
accepted does it write the entry, in the entry's own slot. A write that commits between the check
and the entry's write is not caught by the check — but a lookup serves an entry only after
comparing every dependency's *current* version with the generation the entry records for its
group, in the lookup's own round trip. The bump of that write moved some dependency's version past
the reader's generation (bumps come after their commit; the reader's generation was observed
before its database read), so the late entry is a miss, and is deleted, every time it is read. A
version lost in between reads as missing, which is a miss too. Hence a stale store can be *made*
(rarely: the window is one round trip) but never *served*; once ``commit()`` returns, its bump
is in every group it touched and no lookup anywhere accepts an entry older than it.

**Lookup.** With the hint (the dependencies the reader expects) the entry and the hinted groups'
generations and versions are read in one pipelined round trip (one request per node, written to all
nodes before any reply is read); dependencies the entry names outside the hint cost a second round
trip. Without a hint the entry is read first, then its dependencies' versions.

**Bump.** One script per group touched (``bump.lua``, its fan-out by ``SPUBLISH`` on the group's
shard channel ``<group>:fanout`` with the group's sequence ``<group>:seq``: see cluster_fanout.py
for the near-cache's subscriber), pipelined over the nodes. If any group fails the bump raises
:class:`~sqlacache.backends.base.BackendError`: the cache keeps the invalidation pending and
retries all of it (bumping a group twice is harmless: one more miss). The groups that succeeded
are not rolled back and need not be: a bump only ever moves versions forward.

**Failover: the node check.** Replication is asynchronous: a bump acknowledged by a master can be
missing on the replica promoted in its place, which then holds the group's old versions, and every
entry depending on that group (in any slot, on any node) looks valid again, to every process.
identity.py's answer, per node: each node records, in a key of the first slot it serves
(``P:{P|n|<i>}:run``, ``i`` picked so that the tag hashes to that slot; it replicates and migrates
with the slot), the ``run_id`` of the server the data was checked on. Every connection the cluster
client opens runs, inside its connect step (``user_on_connect_func`` of the sync client, the
nodes' ``redis_connect_func`` of the asyncio one), ``CLUSTER NODES`` and a script comparing that
key with the server's ``run_id``. A difference (a promoted replica, a restarted or flushed node, a
slot that moved) is recorded and moves an epoch; the backend then, before any other call goes on,
bumps ``*`` in every stripe (every entry outdated, on every node), forgets what its handles
recorded (``_Clock.clear``: a group's counter may have gone back; stores from older handles are
refused), and only then records the new ``run_id`` (by a script that writes it only on that
server). A call whose batch saw the epoch move (a new node met during it) starts over: its replies
may come from a node not yet healed. A process that meets the node after the record finds it
matching, and the ``*`` bump was done before the record was written, so no process serves from
the promoted replica what it lost. The first call of a backend opens a connection to every
primary, so that the check (and, for a new prefix, the first heal) comes before any handle is
handed out. ``watch_servers=False`` turns the check off. Bumps that fail while a slot has no
master raise (the cache keeps them pending); reads of a group whose node is down fail, and are
misses, whatever node the entry is on.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import zlib
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, ResponseError
from redis.retry import Retry

from sqlacache._sa import await_ as _await
from sqlacache._sa import in_greenlet as _in_greenlet
from sqlacache.backends.base import BackendError, BackendUnavailable, Entry, Listener, Lookup, Position
from sqlacache.backends.redis import leases, scripts
from sqlacache.backends.redis.backend import _glob_escape, _root, _ttl_ms
from sqlacache.backends.redis.cluster_fanout import ClusterSubscriber, parse_position
from sqlacache.backends.redis.errors import FAILURES, failure
from sqlacache.backends.redis.signing import FanoutKeys, Verifier, count_arg, signing_keys

__all__ = ["RedisClusterBackend", "parse_cluster_url"]

log = logging.getLogger("sqlacache.backend")

_T = TypeVar("_T")

_DEFAULT_VERSION_TTL = 7 * 86400.0
_FAILURES: tuple[type[BaseException], ...] = (*FAILURES, RedisClusterException)


def _bump_source() -> str:
    """``bump.lua`` with its fan-out on the group's shard channel (SPUBLISH): what a group's bump
    does, its sequence ``<group>:seq`` and channel ``<group>:fanout`` in the group's slot."""
    text = scripts.source("bump")
    marker = "redis.call('PUBLISH', prefix .. ':fanout'"
    if text.count(marker) != 1:  # pragma: no cover - bump.lua changed shape: fail loudly at import
        raise RuntimeError("bump.lua no longer publishes where cluster.py expects it")
    return text.replace(marker, "redis.call('SPUBLISH', prefix .. ':fanout'")


class _Script:
    __slots__ = ("body", "sha")

    def __init__(self, body: bytes) -> None:
        import hashlib

        self.body = body
        self.sha = hashlib.sha1(body).hexdigest()


_CHECK = _Script((scripts.PRELUDE + scripts.CHECK + "\n" + scripts.source("cluster_check")).encode())
_ROOTS = _Script((scripts.PRELUDE + "\n" + scripts.source("cluster_roots")).encode())
_BUMP = _Script((scripts.PRELUDE + "\n" + _bump_source()).encode())
_ENTRY = _Script(("\n" + scripts.source("cluster_entry")).encode())
_RELEASE = _Script(scripts.RELEASE)

# The node check (identity.py's, on a key of a slot the node serves): {1} when the node is the
# server recorded there; else {0, its run_id, the recorded one or false}.
_WHO = b"""
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if not run then
  return redis.error_reply('sqlacache: INFO server has no run_id')
end
local known = redis.call('GET', KEYS[1])
if known == run then
  return {1}
end
return {0, run, known}
"""
# Records ARGV[1] as the node's server, only on that server (the slot may have moved meanwhile).
_MARK = _Script(
    b"""
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if run == ARGV[1] then
  redis.call('SET', KEYS[1], run)
  return 1
end
return 0
"""
)
# How many times a call starts over because a node turned out to be a new server during it.
_RESTARTS = 3


def _first_slot(nodes: Any) -> int | None:
    """The first slot the connected node serves, from its ``CLUSTER NODES`` (None: it serves none)."""
    text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8 or "myself" not in fields[2].split(","):
            continue
        if "master" not in fields[2].split(","):
            return None
        for field in fields[8:]:
            if field[:1].isdigit():
                return int(field.split("-", 1)[0])
        return None
    return None


# A command of a batch: ("GET", key) etc., or (script, keys, args) for a script.
_Command = tuple[Any, ...]
_Batch = list[_Command]


def _wire(command: _Command) -> tuple[Any, ...]:
    if isinstance(command[0], _Script):
        script, keys, args = command
        return ("EVALSHA", script.sha, len(keys), *keys, *args)
    return command


def _unsha(command: _Command) -> tuple[Any, ...]:
    script, keys, args = command
    return ("EVAL", script.body, len(keys), *keys, *args)


def _group_name(dep: str) -> str | None:
    """The table group a dependency belongs to, or None for the global group (``*``, ``d:``)."""
    if dep[:2] in ("t:", "r:", "c:", "a:", "s:"):
        return dep[2:].split(":", 1)[0]
    return None


class _Clock:
    """What this process has observed of each group's generation, and the handles standing for it."""

    def __init__(self, keep: int = 4096) -> None:
        self._lock = threading.Lock()
        self._keep = keep
        self.handle = 1
        self._seen: dict[str, tuple[list[int], list[int]]] = {}  # group -> (handles, generations)

    def observe(self, gens: Mapping[str, int]) -> int:
        with self._lock:
            bumped = False
            for group, g in gens.items():
                handles, values = self._seen.setdefault(group, ([], []))
                if values and g <= values[-1]:
                    continue
                if not bumped:
                    self.handle += 1
                    bumped = True
                handles.append(self.handle)
                values.append(g)
                if len(values) > self._keep:  # older handles then record 0 here: refused, safe
                    del handles[: -self._keep], values[: -self._keep]
            return self.handle

    def at(self, handle: int, group: str) -> int:
        """The generation ``handle`` records for ``group`` (0: none observed by then)."""
        with self._lock:
            seen = self._seen.get(group)
            if seen is None:
                return 0
            i = bisect.bisect_right(seen[0], handle) - 1
            return seen[1][i] if i >= 0 else 0

    def clear(self) -> None:
        with self._lock:  # handles go on growing; what they record starts over
            self._seen.clear()
            self.handle += 1


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``redis(s)+cluster://[user:password@]host:port[,host:port…]/[?options]``: the startup nodes
    and the client's keyword arguments. The options are redis-py's URL options (``socket_timeout``,
    ``ssl_ca_certs``, ``ssl_cert_reqs``, ``ssl_certfile``, ``ssl_keyfile``…), for the connection to
    every node; connect.py refuses the ones redis-py does not know. ``ValueError`` says what to fix."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    example = "write e.g. 'redis+cluster://10.0.0.1:7000,10.0.0.2:7000/'"
    if not sep or scheme not in ("redis+cluster", "rediss+cluster"):
        raise ValueError(f"not a Redis Cluster URL; {example}")
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    if "?" in netloc:
        netloc, _, query = netloc.partition("?")
    if path.strip("/"):
        raise ValueError(
            f"the path '/{path}' selects a database, and a Redis Cluster has only database 0; "
            f"drop it, {example}"
        )
    kwargs: dict[str, Any] = {}
    if query:
        options: dict[str, Any] = redis.connection.parse_url(f"redis://h/?{query}")  # type: ignore[no-untyped-call]
        for key in ("host", "port", "path", "connection_class"):
            options.pop(key, None)
        if "db" in options:
            raise ValueError(f"'db' selects a database, and a Redis Cluster has only database 0; {example}")
        kwargs.update(options)
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        if colon:
            kwargs["password"] = unquote(password)
            if user:
                kwargs["username"] = unquote(user)
        elif user:
            kwargs["password"] = unquote(user)
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        if not part.strip():
            raise ValueError(f"an empty host in the node list; {example}")
        parsed = urlsplit(f"//{part.strip()}")
        try:
            port = parsed.port or 6379
        except ValueError as exc:
            raise ValueError(f"bad port in {part!r}; {example}") from exc
        if not parsed.hostname:
            raise ValueError(f"no host in {part!r}; {example}")
        nodes.append((parsed.hostname, port))
    if scheme == "rediss+cluster":
        kwargs["ssl"] = True
    return nodes, kwargs


class _Side:
    """One cluster client and how to run a batch of commands on it (sync, or awaited)."""

    def __init__(self, client: Any, is_async: bool) -> None:
        self.client = client
        self.is_async = is_async

    def run(self, batch: _Batch) -> list[Any]:
        if self.is_async:
            replies: list[Any] = _await(self.arun(batch))
            return replies
        if len(batch) == 1:
            return [self._one(batch[0])]
        pipe = self.client.pipeline(transaction=False)
        for command in batch:
            pipe.execute_command(*_wire(command))
        replies = pipe.execute(raise_on_error=False)
        redo = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if redo:
            again = self.client.pipeline(transaction=False)
            for i in redo:
                again.execute_command(*_unsha(batch[i]))
            for i, reply in zip(redo, again.execute(raise_on_error=False)):
                replies[i] = reply
        return _raise_first(replies)

    def _one(self, command: _Command) -> Any:
        try:
            return self.client.execute_command(*_wire(command))
        except NoScriptError:
            return self.client.execute_command(*_unsha(command))

    async def arun(self, batch: _Batch) -> list[Any]:
        if len(batch) == 1:
            try:
                return [await self.client.execute_command(*_wire(batch[0]))]
            except NoScriptError:
                return [await self.client.execute_command(*_unsha(batch[0]))]
        pipe = self.client.pipeline()
        for command in batch:
            pipe.execute_command(*_wire(command))
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        redo = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if redo:
            again = self.client.pipeline()
            for i in redo:
                again.execute_command(*_unsha(batch[i]))
            for i, reply in zip(redo, await again.execute(raise_on_error=False)):
                replies[i] = reply
        return _raise_first(replies)


def _failure(what: str, exc: BaseException) -> BackendError:
    if isinstance(exc, RedisClusterException):  # no node reachable, or no slot map to be had
        return BackendUnavailable(f"Redis Cluster {what} failed: {type(exc).__name__}: {exc}", "connection")
    return failure(what, exc)


def _raise_first(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return replies


def _int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise BackendError(f"Redis Cluster returned a malformed {what}: {value!r}", "protocol") from exc


def _version(value: Any) -> int | None:
    """A version as stored (digits, or a registry's "digits|scheme…"), or None if missing/foreign."""
    if not isinstance(value, bytes):
        return None
    digits = value.partition(b"|")[0]
    return int(digits) if digits.isdigit() else None


class RedisClusterBackend:
    """A :class:`~sqlacache.backends.base.Backend` on Redis Cluster (see the module docstring).

    Give it a ``redis.cluster.RedisCluster``, a ``redis.asyncio.cluster.RedisCluster``, or both;
    or build it with :meth:`from_url`. With both, calls inside SQLAlchemy's greenlet (an
    ``AsyncSession``) await the asyncio client; other calls use the sync one. Clients passed in are
    not closed by :meth:`close`.
    """

    def __init__(
        self,
        client: redis.cluster.RedisCluster | None = None,
        *,
        async_client: redis.asyncio.cluster.RedisCluster | None = None,
        prefix: str = "sqlacache",
        version_ttl: float = _DEFAULT_VERSION_TTL,
        stripes: int = 64,
        watch_servers: bool = True,
    ) -> None:
        if not prefix:
            raise ValueError("prefix must not be empty")
        if "{" in prefix or "}" in prefix:
            raise ValueError("a Redis Cluster prefix must not contain '{' or '}' (hash tags are ours)")
        if not version_ttl > 0:
            raise ValueError("version_ttl must be positive")
        self.prefix = prefix
        self.corrupt_entries = 0
        self._vttl = str(_ttl_ms(version_ttl))
        self.server_changes = 0  # nodes found holding data written on another server (or none)
        self._watch = watch_servers
        self._lost: dict[str, bytes] = {}  # run key -> the new server's run_id, until healed
        self._epoch = 0  # moves when a node is found changed, and when that is healed
        self._slot_tags: dict[int, str] = {}
        self._primed = not watch_servers
        self._aprimed = not watch_servers
        self._sync = _Side(client, False) if client is not None else None
        self._async = _Side(async_client, True) if async_client is not None else None
        if watch_servers and client is not None:
            self._watch_sync(client)
        if watch_servers and async_client is not None:
            self._watch_async(async_client)
        self._sync_factory: Callable[[], Any] | None = None
        self._async_factory: Callable[[], Any] | None = None
        self._owns_clients = False
        self._closed = False
        self._lock = threading.Lock()
        self._clock = _Clock()
        self._subscribers: list[ClusterSubscriber] = []
        self._fanout_keys: FanoutKeys | None = None  # sign_fanout
        if stripes < 1:
            raise ValueError("stripes must be at least 1")
        self._stripes = stripes

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "sqlacache",
        version_ttl: float = _DEFAULT_VERSION_TTL,
        socket_timeout: float = 0.05,
        socket_connect_timeout: float = 0.05,
        watch_servers: bool = True,
        **client_kwargs: Any,
    ) -> RedisClusterBackend:
        """``redis+cluster://host:port[,host:port…]/`` (``rediss+cluster://`` for TLS; redis-py's URL
        options as the query, e.g. ``?ssl_ca_certs=/etc/ssl/redis-ca.pem``: see
        :func:`parse_cluster_url`): clients made on first use (the cluster's slot map is read then),
        with the short timeouts ``RedisBackend.from_url`` uses unless the URL or ``client_kwargs``
        say otherwise."""
        nodes, url_kwargs = parse_cluster_url(url)
        kwargs: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            **url_kwargs,
            **client_kwargs,
        }
        backend = cls(prefix=prefix, version_ttl=version_ttl, watch_servers=watch_servers)
        dropped = (redis.exceptions.ConnectionError,)

        def make_sync() -> Any:
            sync_kwargs = dict(kwargs)
            sync_kwargs.setdefault("retry", Retry(NoBackoff(), 1, supported_errors=dropped))
            startup = [redis.cluster.ClusterNode(host, port) for host, port in nodes]  # type: ignore[no-untyped-call]
            return redis.cluster.RedisCluster(startup_nodes=startup, **sync_kwargs)

        def make_async() -> Any:
            from redis.asyncio.retry import Retry as AsyncRetry

            async_kwargs = dict(kwargs)
            async_kwargs.setdefault("retry", AsyncRetry(NoBackoff(), 1, supported_errors=dropped))
            startup = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in nodes]
            return redis.asyncio.cluster.RedisCluster(startup_nodes=startup, **async_kwargs)

        backend._sync_factory = make_sync
        backend._async_factory = make_async
        backend._owns_clients = True
        return backend

    @property
    def sync_capable(self) -> bool:
        return self._sync is not None or self._sync_factory is not None

    # -- keys -----------------------------------------------------------------------------------

    def _base(self, dep: str, stripe: str) -> str:
        """The group of ``dep`` for an entry in ``stripe`` (global deps live in every stripe)."""
        name = _group_name(dep)
        if name is None:
            return stripe
        return f"{self.prefix}:{{{self.prefix}|t|{name}}}"

    def _stripe_of(self, i: int) -> str:
        return f"{self.prefix}:{{{self.prefix}|s|{i}}}"

    def _stripe(self, key: str) -> str:
        return self._stripe_of(zlib.crc32(key.encode("utf-8", "surrogatepass")) % self._stripes)

    def _entry_keys(self, key: str) -> list[str]:
        tag = "{" + self._stripe(key).split("{", 1)[1]
        return [f"{self.prefix}:e:{tag}{key}", f"{self.prefix}:l:{tag}{key}"]

    # -- dispatch -------------------------------------------------------------------------------

    def _make_sync(self) -> _Side | None:
        if self._sync is None and self._sync_factory is not None:
            with self._lock:
                if self._sync is None:
                    client = self._sync_factory()
                    if self._watch:
                        self._watch_sync(client)
                    self._sync = _Side(client, False)
        return self._sync

    def _make_async(self) -> _Side | None:
        if self._async is None and self._async_factory is not None:
            with self._lock:
                if self._async is None:
                    client = self._async_factory()
                    if self._watch:
                        self._watch_async(client)
                    self._async = _Side(client, True)
        return self._async

    def _side(self) -> _Side:
        if self._closed:
            raise BackendError("RedisClusterBackend is closed")
        if (self._async is not None or self._async_factory is not None) and _in_greenlet():
            side = self._make_async()
            if side is not None:
                return side
        side = self._make_sync()
        if side is not None:
            return side
        raise BackendError(
            "RedisClusterBackend has only an asyncio client and was called outside an AsyncSession; "
            "pass a sync client too (RedisClusterBackend(client=..., async_client=...))"
        )

    def _drive(self, what: str, make: Callable[[], Generator[_Batch, list[Any], _T]]) -> _T:
        try:
            side = self._side()
            if not (self._aprimed if side.is_async else self._primed):
                self._prime(side)
            for _ in range(_RESTARTS):
                if self._lost:
                    self._run_sync(side, self._heal_steps())
                epoch = self._epoch
                steps = make()
                try:
                    batch = next(steps)
                    while True:
                        replies = side.run(batch)
                        if self._epoch != epoch or self._lost:
                            break  # a node changed during the batch: its replies may be stale
                        batch = steps.send(replies)
                except StopIteration as done:
                    result: _T = done.value
                    return result
                finally:
                    steps.close()
        except _FAILURES as exc:
            raise _failure(what, exc) from exc
        raise BackendUnavailable(f"Redis Cluster {what}: its nodes kept changing", "connection")

    def _prime(self, side: _Side) -> None:
        """A connection to every primary at first use, so that the check of each (and the heal of
        what it finds) comes before the first handle is handed out, not in the middle of a call."""
        if side.is_async:
            self._aprimed = True
            with contextlib.suppress(*_FAILURES):
                _await(side.client.execute_command("PING", target_nodes=side.client.PRIMARIES))
            return
        self._primed = True
        with contextlib.suppress(*_FAILURES):
            side.client.execute_command("PING", target_nodes=side.client.PRIMARIES)

    @staticmethod
    def _run_sync(side: _Side, steps: Generator[_Batch, list[Any], None]) -> None:
        try:
            batch = next(steps)
            while True:
                batch = steps.send(side.run(batch))
        except StopIteration:
            return

    async def _adrive(self, what: str, make: Callable[[], Generator[_Batch, list[Any], _T]]) -> _T:
        if self._closed:
            raise BackendError("RedisClusterBackend is closed")
        try:
            side = self._make_async()
            if side is None:
                raise BackendError("RedisClusterBackend has no asyncio client")
            if not self._aprimed:
                self._aprimed = True
                with contextlib.suppress(*_FAILURES):
                    await side.client.execute_command("PING", target_nodes=side.client.PRIMARIES)
            for _ in range(_RESTARTS):
                if self._lost:
                    heal = self._heal_steps()
                    try:
                        batch = next(heal)
                        while True:
                            batch = heal.send(await side.arun(batch))
                    except StopIteration:
                        pass
                epoch = self._epoch
                steps = make()
                try:
                    batch = next(steps)
                    while True:
                        replies = await side.arun(batch)
                        if self._epoch != epoch or self._lost:
                            break
                        batch = steps.send(replies)
                except StopIteration as done:
                    result: _T = done.value
                    return result
                finally:
                    steps.close()
        except _FAILURES as exc:
            raise _failure(what, exc) from exc
        raise BackendUnavailable(f"Redis Cluster {what}: its nodes kept changing", "connection")

    # -- nodes that are not the server the data was written on (failover, restart) ---------------

    def _heal_steps(self) -> Generator[_Batch, list[Any], None]:
        """``*`` bumped in every stripe, this process's handles forgotten, and only then the new
        servers recorded (each in its own run key, by a script that checks it runs on that server)."""
        with self._lock:
            lost = dict(self._lost)
        if not lost:
            return
        bases = [self._stripe_of(i) for i in range(self._stripes)]
        keys = self._fanout_keys
        replies = yield [(_BUMP, [f"{b}:gen"], [b, self._vttl, count_arg(keys, b, 1), "*"]) for b in bases]
        for reply in replies:
            _int(reply, "generation")
        self._clock.clear()
        yield [(_MARK, [key], [run]) for key, run in lost.items()]
        with self._lock:
            for key, run in lost.items():
                if self._lost.get(key) == run:
                    del self._lost[key]
            self._epoch += 1

    def _run_key(self, slot: int) -> str:
        """A key of this prefix in ``slot``: where a node serving it records its ``run_id``."""
        tag = self._slot_tags.get(slot)
        if tag is None:
            i = 0
            while True:
                candidate = f"{self.prefix}|n|{i}"
                if key_slot(candidate.encode()) == slot:
                    break
                i += 1
            tag = self._slot_tags[slot] = candidate
        return f"{self.prefix}:{{{tag}}}:run"

    def _found(self, connection: Any, reply: Any, key: str) -> None:
        if isinstance(reply, list) and reply and reply[0] == 1:
            return
        if not (isinstance(reply, list) and len(reply) >= 2 and isinstance(reply[1], bytes)):
            raise ResponseError(f"sqlacache: malformed reply to the server check: {reply!r}")
        with self._lock:
            self._lost[key] = reply[1]
            self._epoch += 1
            self.server_changes += 1
        known = reply[2] if len(reply) > 2 and isinstance(reply[2], bytes) else None
        where = f"{getattr(connection, 'host', '?')}:{getattr(connection, 'port', '?')}"
        if known is None:
            log.info("sqlacache: Redis Cluster node %s holds no record of its server: invalidate all", where)
        else:
            log.warning(
                "sqlacache: Redis Cluster node %s is not the server its data was written on (run_id %s, "
                "was %s): a failover or a restart may have lost writes; invalidating all",
                where,
                reply[1].decode(),
                known.decode(),
            )

    def _check_node(self, connection: Any) -> None:
        connection.send_command("CLUSTER", "NODES")
        slot = _first_slot(connection.read_response())
        if slot is None:  # a replica, or a master without slots: holds nothing we read
            return
        key = self._run_key(slot)
        connection.send_command("EVAL", _WHO, 1, key)
        self._found(connection, connection.read_response(), key)

    async def _acheck_node(self, connection: Any) -> None:
        await connection.send_command("CLUSTER", "NODES")
        slot = _first_slot(await connection.read_response())
        if slot is None:
            return
        key = self._run_key(slot)
        await connection.send_command("EVAL", _WHO, 1, key)
        self._found(connection, await connection.read_response(), key)

    def _watch_sync(self, client: Any) -> None:
        previous = getattr(client, "user_on_connect_func", None)
        if getattr(previous, "watch", None) is self:
            return

        def hook(connection: Any) -> None:
            if previous is not None:
                previous(connection)
            self._check_node(connection)

        hook.watch = self  # type: ignore[attr-defined]
        client.user_on_connect_func = hook
        for node in client.get_nodes():  # connected before: they reconnect (and check) on next use
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect(inuse_connections=False)

    def _watch_async(self, client: Any) -> None:
        manager = client.nodes_manager
        previous = manager.connection_kwargs.get("redis_connect_func")
        if getattr(previous, "watch", None) is self:
            return

        async def hook(connection: Any) -> None:
            if previous is not None:
                await previous(connection)
            else:
                await connection.on_connect()
            await self._acheck_node(connection)

        hook.watch = self  # type: ignore[attr-defined]
        manager.connection_kwargs["redis_connect_func"] = hook
        for node in client.get_nodes():
            node.connection_kwargs["redis_connect_func"] = hook
            for connection in [*node._connections, *node._free]:
                connection.redis_connect_func = hook

    def _has_async(self) -> bool:
        return self._async is not None or self._async_factory is not None

    # -- lookup -----------------------------------------------------------------------------------

    def _read_groups(
        self, deps: Sequence[str], stripe: str, entry_key: str | None = None
    ) -> tuple[_Batch, list[tuple[str, list[str]]]]:
        """MGETs of each group's generation and the versions of ``deps`` in it; with ``entry_key``,
        the first MGET is the stripe's and reads the entry first (reply: entry, then the group's)."""
        groups: dict[str, list[str]] = {stripe: []} if entry_key is not None else {}
        for dep in deps:
            groups.setdefault(self._base(dep, stripe), []).append(dep)
        batch: _Batch = [
            ("MGET", f"{base}:gen", *(f"{base}:v:{d}" for d in ds)) for base, ds in groups.items()
        ]
        if entry_key is not None:
            batch[0] = ("MGET", entry_key, *batch[0][1:])
        return batch, list(groups.items())

    def _absorb(
        self, replies: Sequence[Any], groups: list[tuple[str, list[str]]], versions: dict[str, int | None]
    ) -> None:
        gens: dict[str, int] = {}
        for reply, (base, deps) in zip(replies, groups):
            if not isinstance(reply, list) or len(reply) != len(deps) + 1:
                raise BackendError(f"Redis Cluster MGET returned a malformed reply: {reply!r}", "protocol")
            g = _version(reply[0])
            if g is not None:
                gens[base] = g
            for dep, value in zip(deps, reply[1:]):
                versions[dep] = _version(value)
        if gens:
            self._clock.observe(gens)

    def _parse(self, raw: bytes, stripe: str) -> tuple[Entry, dict[str, int]] | None:
        header, sep, payload = raw.partition(b"\n")
        if not sep:
            return None
        fields = header.split(b"\x1f")
        try:
            gens = [int(g) for g in fields[0].split(b",")] if fields[0] else []
            deps = tuple(f.decode() for f in fields[1:])
        except (ValueError, UnicodeDecodeError):
            return None
        bases = list(dict.fromkeys(self._base(d, stripe) for d in deps))
        if len(bases) != len(gens):
            return None
        return Entry(payload, deps), dict(zip(bases, gens))

    def _lookup_steps(
        self, key: str, hint: Sequence[str], lease: tuple[str, int] | None = None
    ) -> Generator[_Batch, list[Any], tuple[Lookup, bool]]:
        entry_key, lease_key = self._entry_keys(key)
        stripe = self._stripe(key)
        looked = list(dict.fromkeys([*hint, *map(_root, hint)]))
        versions: dict[str, int | None] = {}
        raw: Any
        taken = False
        if lease is None:
            reads, groups = self._read_groups(looked, stripe, entry_key)
            replies = yield reads
            first = replies[0]
            if not isinstance(first, list) or not first:
                raise BackendError(f"Redis Cluster MGET returned a malformed reply: {first!r}", "protocol")
            raw = first[0]
            self._absorb([first[1:], *replies[1:]], groups, versions)
        else:
            reads, groups = self._read_groups(looked, stripe)
            replies = yield [(_ENTRY, [entry_key, lease_key], ["get", lease[0], str(lease[1])]), *reads]
            self._absorb(replies[1:], groups, versions)
            reply = replies[0]
            if not isinstance(reply, list) or len(reply) != 2:
                raise BackendError(f"Redis Cluster lease returned a malformed reply: {reply!r}", "protocol")
            raw = reply[1] if reply[0] == 1 else None
            taken = reply[0] == 0 and reply[1] == 1
        if raw is not None:
            parsed = self._parse(raw, stripe) if isinstance(raw, bytes) else None
            if parsed is None:
                with self._lock:
                    self.corrupt_entries += 1
            else:
                entry, recorded = parsed
                unread = [d for d in entry.deps if d not in versions]
                if unread:
                    more, more_groups = self._read_groups(unread, stripe)
                    self._absorb((yield more), more_groups, versions)
                if all(
                    (v := versions[d]) is not None and v <= recorded[self._base(d, stripe)]
                    for d in entry.deps
                ):
                    return Lookup(entry, self._clock.handle), False
            # Stale or corrupt: deleted (and, for a lease, the lease tried in the same step).
            if lease is None:
                yield [("UNLINK", entry_key)]
            else:
                reply = (yield [(_ENTRY, [entry_key, lease_key], ["drop", lease[0], str(lease[1])])])[0]
                taken = isinstance(reply, list) and len(reply) == 2 and reply[1] == 1
        # A miss makes the expected roots exist (see lookup.lua), so the store that follows is accepted.
        missing: dict[str, list[str]] = {}
        for dep in dict.fromkeys(map(_root, hint)):
            if versions.get(dep) is None:
                missing.setdefault(self._base(dep, stripe), []).append(dep)
        if missing:
            bases = [b for b in missing if b != stripe]
            made = yield [(_ROOTS, [f"{b}:gen"], [b, self._vttl, *missing[b]]) for b in bases]
            self._clock.observe({b: _int(g, "generation") for b, g in zip(bases, made)})
            if stripe in missing:
                yield from self._spread_roots(missing[stripe])
        return Lookup(None, self._clock.handle), taken

    def _spread_roots(self, deps: list[str]) -> Generator[_Batch, list[Any], None]:
        """Global dependencies missing in a stripe: created ("bumped now") in every stripe that
        lacks them, so that one first read (or one refused store) makes them exist for every key."""
        if not deps:
            return
        bases = [self._stripe_of(i) for i in range(self._stripes)]
        made = yield [(_ROOTS, [f"{b}:gen"], [b, self._vttl, *deps]) for b in bases]
        self._clock.observe({b: _int(g, "generation") for b, g in zip(bases, made)})

    def lookup(self, key: str, hint: Sequence[str] = ()) -> Lookup:
        return self._drive("lookup", lambda: self._lookup_steps(key, hint))[0]

    async def alookup(self, key: str, hint: Sequence[str] = ()) -> Lookup:
        """``lookup`` awaited on the event loop with the asyncio client."""
        if not self._has_async():
            return self.lookup(key, hint)
        return (await self._adrive("lookup", lambda: self._lookup_steps(key, hint)))[0]

    def generation(self) -> int:
        """The current handle (no round trip: it stands for what this process has observed)."""
        if self._closed:
            raise BackendError("RedisClusterBackend is closed")
        return self._clock.handle

    # -- store ------------------------------------------------------------------------------------

    def _store_steps(
        self, key: str, payload: bytes, deps: Sequence[str], generation: int, ttl: float, lease: str | None
    ) -> Generator[_Batch, list[Any], bool]:
        entry_key, lease_key = self._entry_keys(key)
        for dep in deps:
            if "\x1f" in dep or "\n" in dep:
                raise ValueError(f"dependency name {dep!r} contains a separator character (\\x1f or \\n)")
        if not ttl > 0:  # also rejects NaN
            if lease is not None:
                yield [(_ENTRY, [entry_key, lease_key], ["free", lease])]
            return False
        ttl_ms = str(_ttl_ms(ttl))
        stripe = self._stripe(key)
        groups: dict[str, list[str]] = {}
        for dep in deps:
            groups.setdefault(self._base(dep, stripe), []).append(dep)
        handle = int(generation)
        recorded = {base: self._clock.at(handle, base) for base in groups}
        accepted = True
        if groups:
            bases = list(groups)
            replies = yield [
                (_CHECK, [f"{b}:gen"], [b, str(recorded[b]), ttl_ms, self._vttl, *groups[b]]) for b in bases
            ]
            gens: dict[str, int] = {}
            spread = False
            for base, reply in zip(bases, replies):
                if not isinstance(reply, list) or len(reply) != 3:
                    raise BackendError(
                        f"Redis Cluster store returned a malformed reply: {reply!r}", "protocol"
                    )
                accepted = accepted and reply[0] == 1
                gens[base] = _int(reply[1], "generation")
                spread = spread or reply[2] == 1
            self._clock.observe(gens)
            if spread:  # a global dep was missing in this stripe: make it exist in all of them
                yield from self._spread_roots([d for d in groups.get(stripe, []) if _group_name(d) is None])
        if not accepted:
            if lease is not None:
                yield [(_ENTRY, [entry_key, lease_key], ["free", lease])]
            return False
        header = b",".join(str(recorded[b]).encode() for b in groups)
        value = b"\x1f".join([header, *(d.encode() for d in deps)]) + b"\n" + bytes(payload)
        yield [(_ENTRY, [entry_key, lease_key], ["set", value, ttl_ms, lease or ""])]
        return True

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
        """See the contract and the module docstring (check per group, then the entry)."""
        return self._drive("store", lambda: self._store_steps(key, payload, deps, generation, ttl, lease))

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
        if not self._has_async():
            return self.store(key, payload, deps, generation, ttl, lease=lease)
        return await self._adrive(
            "store", lambda: self._store_steps(key, payload, deps, generation, ttl, lease)
        )

    # -- leases -----------------------------------------------------------------------------------

    def lease(self, key: str, ttl: float, hint: Sequence[str] = ()) -> tuple[Lookup, str | bool | None]:
        """``lookup`` and, on a miss, the key's fill lease for ``ttl`` seconds (see the contract)."""
        token = leases.new_token()
        found, taken = self._drive("lease", lambda: self._lookup_steps(key, hint, (token, _ttl_ms(ttl))))
        return leases.outcome(found, taken, token)

    async def alease(
        self, key: str, ttl: float, hint: Sequence[str] = ()
    ) -> tuple[Lookup, str | bool | None]:
        if not self._has_async():
            return self.lease(key, ttl, hint)
        token = leases.new_token()
        lease = (token, _ttl_ms(ttl))
        found, taken = await self._adrive("lease", lambda: self._lookup_steps(key, hint, lease))
        return leases.outcome(found, taken, token)

    def claim(self, key: str, ttl: float) -> str | None:
        token = leases.new_token()
        claim_key = f"{self.prefix}:r:" + self._entry_keys(key)[0].split(":e:", 1)[1]

        def steps() -> Generator[_Batch, list[Any], Any]:
            return (yield [("SET", claim_key, token, "NX", "PX", _ttl_ms(ttl))])[0]

        return token if self._drive("claim", steps) else None

    def release(self, key: str, token: str) -> None:
        lease_key = self._entry_keys(key)[1]

        def steps() -> Generator[_Batch, list[Any], None]:
            yield [(_RELEASE, [lease_key], [token])]

        self._drive("release", steps)

    # -- bump -------------------------------------------------------------------------------------

    def bump(
        self, deps: Sequence[str], rows: Sequence[tuple[str, Mapping[str, str], int | None]] = ()
    ) -> None:
        if not deps and not rows:
            return
        groups: dict[str, tuple[list[str], list[str]]] = {}
        for dep in dict.fromkeys(deps):
            if _group_name(dep) is None:  # a global dependency: in every stripe
                for i in range(self._stripes):
                    groups.setdefault(self._stripe_of(i), ([], []))[0].append(dep)
            else:
                groups.setdefault(self._base(dep, ""), ([], []))[0].append(dep)
        for table, values, guard in rows:
            base = self._base("t:" + table, "")
            # The guard is a handle: what it recorded for the table's group (0: untrusted).
            head = [table, "-" if guard is None else str(self._clock.at(int(guard), base))]
            image = "\x1f".join([*head, *(x for item in values.items() for x in item)])
            groups.setdefault(base, ([], []))[1].append(image)
        bases = list(groups)
        keys = self._fanout_keys

        def steps() -> Generator[_Batch, list[Any], None]:
            # Built per attempt: a bump run again after a topology change gets fresh nonces (one
            # heard before is refused by the subscribers: signing.py).
            replies = yield [
                (
                    _BUMP,
                    [f"{b}:gen"],
                    [b, self._vttl, count_arg(keys, b, len(groups[b][0])), *groups[b][0], *groups[b][1]],
                )
                for b in bases
            ]
            self._clock.observe({b: _int(g, "generation") for b, g in zip(bases, replies)})

        self._drive("bump", steps)

    # -- fan-out: each group's bump SPUBLISHes on its shard channel; near-caches subscribe ---------

    def sign_fanout(self, secrets: Sequence[bytes]) -> None:
        """Sign every group's fan-out message with the first of ``secrets`` (a one-time key per
        group and bump), and have subscribers accept only those (signing.py). Before ``subscribe``."""
        self._fanout_keys = signing_keys(self._fanout_keys, secrets)

    def subscribe(self, listener: Listener, heartbeat: float) -> ClusterSubscriber:
        """A subscriber thread (cluster_fanout.py) on the groups' shard channels, started."""
        side = self._make_sync()
        if side is None:
            raise ValueError(
                "near_cache on a Redis Cluster needs a sync client for its subscriber thread: "
                "RedisClusterBackend(client=RedisCluster(…), async_client=…)"
            )
        stripes = [self._stripe_of(i) for i in range(self._stripes)]
        verifier = Verifier(self._fanout_keys)
        subscriber = ClusterSubscriber(side.client, stripes, self._groups_of, listener, heartbeat, verifier)
        with self._lock:
            self._subscribers = [s for s in self._subscribers if not s.closed] + [subscriber]
        subscriber.start()
        return subscriber

    def _groups_of(self, key: str, deps: Sequence[str]) -> set[str]:
        stripe = self._stripe(key)
        return {self._base(d, stripe) for d in deps}

    def _position_steps(self) -> Generator[_Batch, list[Any], Position]:
        with self._lock:
            followed = set().union(*(s.followed() for s in self._subscribers if not s.closed))
        groups = sorted(followed) or [self._stripe_of(i) for i in range(self._stripes)]
        replies = yield [("HMGET", f"{g}:seq", "born", "n") for g in groups]
        out = []
        for group, reply in zip(groups, replies):
            at = parse_position(*reply) if isinstance(reply, list) and len(reply) == 2 else None
            if at is None:
                raise BackendError(f"Redis Cluster holds a malformed sequence: {reply!r}", "protocol")
            out.append((group, *at))
        return tuple(out)

    def position(self) -> Position:
        """``(group, born, n)`` of every group this backend's subscribers follow: one pipelined
        round trip (one request per node)."""
        return self._drive("position", self._position_steps)

    async def aposition(self) -> Position:
        if not self._has_async():
            return self.position()
        return await self._adrive("position", self._position_steps)

    # -- housekeeping -----------------------------------------------------------------------------

    def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        batch: _Batch = [("UNLINK", self._entry_keys(k)[0]) for k in keys]

        def steps() -> Generator[_Batch, list[Any], None]:
            yield batch

        self._drive("delete", steps)

    def _is_ours(self, key: bytes) -> bool:
        ours = self.prefix.encode() + b":"
        if not key.startswith(ours):
            return False
        rest = key[len(ours) :]
        tag = b"{" + self.prefix.encode() + b"|"
        return rest.startswith((b"e:" + tag, b"l:" + tag, b"r:" + tag, tag + b"t|", tag + b"s|"))

    def clear(self) -> None:
        """SCAN every primary for this prefix's keys and UNLINK them in batches."""
        side = self._side()
        pattern = _glob_escape(self.prefix) + ":*"
        try:
            if side.is_async:
                _await(self._aclear(side))
                return
            doomed: list[Any] = []
            for k in side.client.scan_iter(match=pattern, count=1000):
                if self._is_ours(k):
                    doomed.append(k)
                if len(doomed) >= 500:
                    side.run([("UNLINK", k) for k in doomed])
                    doomed.clear()
            if doomed:
                side.run([("UNLINK", k) for k in doomed])
        except _FAILURES as exc:
            raise _failure("clear", exc) from exc
        finally:
            self._clock.clear()

    async def _aclear(self, side: _Side) -> None:
        pattern = _glob_escape(self.prefix) + ":*"
        doomed: list[Any] = []
        async for k in side.client.scan_iter(match=pattern, count=1000):
            if self._is_ours(k):
                doomed.append(k)
        for i in range(0, len(doomed), 500):
            await side.arun([("UNLINK", k) for k in doomed[i : i + 500]])

    def close(self) -> None:
        """Close the clients this backend built (see :meth:`from_url`); further calls fail."""
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
