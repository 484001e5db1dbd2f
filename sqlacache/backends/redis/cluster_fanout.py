"""Fan-out on Redis Cluster: sharded pub/sub, one shard channel and one sequence per group.

Each group's bump (``bump.lua``, run in the group's slot by ``cluster.py``) publishes with
``SPUBLISH`` on ``<group>:fanout`` and counts in ``<group>:seq`` (``born``/``n``, as on one Redis),
both in the group's own slot: the order of a group's messages is the order of its bumps, and no key
is written by every commit.

:class:`ClusterSubscriber` follows groups, in one daemon thread, on one connection of its own per
primary (``SSUBSCRIBE`` needs its channels' slots to be the node's): the 64 stripes (the global
dependencies) from the start, a table group from its first sight on — the near-cache asks
``covers(key, deps)`` before it takes an entry, and a group not followed yet is then subscribed to;
the entry is not taken. Once the group's subscription is confirmed and its position read, it is in
step, and the listener is told (``widened``: reads that began before are not taken, since a bump of
the group may have come before the subscription). Per group it applies ``n`` only right after
``n - 1`` of the same ``born``; anything else (a gap, another ``born``, ``-``, a resubscription) on
any group, or a node's connection lost or silent past the heartbeat, loses step: the near-cache
empties, and it is in step again once every group it followed is.

A *position* (strict coherence) is the tuple of ``(group, born, n)`` for every group followed, read
in one pipelined round trip; ``caught_up`` holds when every one of them has been applied here. A
group followed later needs no check: it was in step (its position read) after that position was
read, and the near-cache took its entries only from reads that began after that.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.cluster

from sqlacache.backends.base import Listener
from sqlacache.backends.redis.fanout import _own_client, parse_position
from sqlacache.backends.redis.signing import Verifier

__all__ = ["ClusterSubscriber", "parse_position"]

log = logging.getLogger("sqlacache.fanout")

Seq = tuple[int, int]


class _Silent(Exception):
    """A node sent nothing and did not answer our PING within the heartbeat."""


class _Node:
    """One primary: a client of our own on it and the pub/sub connection for its groups' channels."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pubsub: Any = client.pubsub()
        self.groups: list[str] = []
        self.heard = time.monotonic()
        self.pinged: float | None = None
        self.expected: dict[str, Seq] | None = None

    def sock(self) -> Any:
        connection = self.pubsub.connection
        return getattr(connection, "_sock", None) if connection is not None else None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pubsub.close()
        with contextlib.suppress(Exception):
            self.client.close()


def _read(client: Any, groups: list[str]) -> dict[str, Seq]:
    """The positions of ``groups`` (all on ``client``'s node), one pipelined round trip."""
    pipe = client.pipeline(transaction=False)
    for group in groups:
        pipe.hmget(f"{group}:seq", ["born", "n"])
    out: dict[str, Seq] = {}
    for group, reply in zip(groups, pipe.execute()):
        position = parse_position(*reply)
        if position is None:
            raise ValueError(f"{group}:seq holds a value that isn't a sequence")
        out[group] = position
    return out


class ClusterSubscriber:
    """Follows the groups' shard channels (see the module docstring) until closed."""

    def __init__(
        self,
        client: redis.cluster.RedisCluster,
        stripes: list[str],
        groups_of: Callable[[str, Sequence[str]], set[str]],
        listener: Listener,
        heartbeat: float,
        verifier: Verifier,
    ) -> None:
        self._cluster = client
        # With a secret, only signed messages are applied (signing.py); without, every one is.
        self._verifier = verifier
        self._groups_of = groups_of
        self._listener = listener
        self._heartbeat = heartbeat
        self._lock = threading.Lock()
        self._pos: dict[str, Seq | None] = {}  # every group followed: its position, None out of step
        self._wanted: set[str] = set(stripes)  # to subscribe to
        self._required: set[str] = set(stripes)  # groups whose step the near-cache's depends on
        self._out: set[str] = set(stripes)  # required groups out of step (none: in step)
        self._nodes: dict[str, _Node] = {}  # by "host:port"
        self._where: dict[str, _Node] = {}  # group -> its node
        self._closed = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.resyncs = 0
        self._thread = threading.Thread(target=self._run, name="sqlacache-fanout:cluster", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._wake()
        self._thread.join(max(2.0, 3 * self._heartbeat))
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- asked from other threads ------------------------------------------------------------------

    @property
    def position(self) -> tuple[tuple[str, int, int], ...] | None:
        """What has been applied of every group followed; None while out of step."""
        with self._lock:
            if self._out:
                return None
            return tuple((g, *p) for g, p in self._pos.items() if p is not None)

    def followed(self) -> set[str]:
        """The groups followed, or to be followed (asked for by ``covers``)."""
        with self._lock:
            return {*self._pos, *self._wanted}

    def caught_up(self, position: Any) -> bool:
        """Whether every ``(group, born, n)`` of ``position`` has been applied here, and ``position``
        names every group in step here (one that came into step while it was read may hold entries
        from reads older than it, with bumps in between not applied yet)."""
        at = {group: (born, n) for group, born, n in position}
        with self._lock:
            if self._out:
                return False
            for group, (born, n) in at.items():
                if group in self._pos or group in self._wanted:  # else not followed: none held
                    mine = self._pos.get(group)
                    if mine is None or mine[0] != born or mine[1] < n:
                        return False
            return all(group in at for group, mine in self._pos.items() if mine is not None)

    @property
    def forged(self) -> int:
        """Messages ignored for a missing or bad signature, or a nonce heard before (with a secret)."""
        return self._verifier.forged

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def covers(self, key: str, deps: Sequence[str]) -> bool:
        groups = self._groups_of(key, deps)
        with self._lock:
            missing = [g for g in groups if self._pos.get(g) is None]
            new = [g for g in missing if g not in self._pos and g not in self._wanted]
            self._wanted.update(new)
        if new:
            self._wake()
        return not missing

    # -- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.01
        while not self._closed.is_set():
            try:
                self._listen()
                backoff = 0.01
            except (redis.RedisError, OSError, _Silent, ValueError) as exc:
                log.debug("sqlacache: cluster fan-out subscriber lost a connection: %r", exc)
                with contextlib.suppress(Exception):  # the slot map may have changed
                    self._cluster.nodes_manager.initialize()
            except Exception:  # pragma: no cover - a bug: out of step, and say so
                log.exception("sqlacache: cluster fan-out subscriber failed")
            finally:
                self._lose_all()
            self._closed.wait(backoff)
            backoff = min(backoff * 2, self._heartbeat)

    def _lose_all(self) -> None:
        with self._lock:
            was_in_step = not self._out
            self._wanted.update(self._pos)  # subscribed again from scratch
            self._pos.clear()
            self._out = set(self._required)
        if was_in_step:
            self.resyncs += 1
        self._listener.lost()
        nodes, self._nodes, self._where = list(self._nodes.values()), {}, {}
        for node in nodes:
            node.close()

    def _node_for(self, group: str) -> _Node:
        where = self._cluster.get_node_from_key(f"{group}:fanout")  # type: ignore[no-untyped-call]
        name = f"{where.host}:{where.port}"
        node = self._nodes.get(name)
        if node is None:
            base = self._cluster.get_redis_connection(where)
            node = self._nodes[name] = _Node(_own_client(base, self._heartbeat)[0])
        return node

    def _subscribe_wanted(self) -> None:
        with self._lock:
            wanted, self._wanted = sorted(self._wanted), set()
            for group in wanted:
                self._pos.setdefault(group, None)
        for group in wanted:
            node = self._node_for(group)
            node.groups.append(group)
            self._where[group] = node
            node.pubsub.ssubscribe(f"{group}:fanout")  # one slot per SSUBSCRIBE

    def _listen(self) -> None:
        while not self._closed.is_set():
            self._subscribe_wanted()
            for node in list(self._nodes.values()):
                self._drain(node)
            now = time.monotonic()
            for node in list(self._nodes.values()):
                self._beat(node, now)
            socks = [s for s in (n.sock() for n in self._nodes.values()) if s is not None]
            readable, _, _ = select.select([self._wake_r, *socks], [], [], self._heartbeat / 4)
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass

    def _drain(self, node: _Node) -> None:
        while True:
            message = node.pubsub.get_message(timeout=0)
            if message is None:
                return
            node.heard, node.pinged = time.monotonic(), None
            kind = message.get("type")
            if kind == "pong":
                expected, node.expected = node.expected, None
                for late, at in (expected or {}).items():
                    mine = self._pos.get(late)
                    if mine is not None and (mine[0] != at[0] or mine[1] < at[1]):
                        self._resync(node, late)  # a message lost on the way
                continue
            channel = message.get("channel")
            group = channel.decode()[: -len(":fanout")] if isinstance(channel, bytes) else None
            if group is None or group not in self._pos:
                raise ValueError(f"a pub/sub message we did not ask for: {message!r}")
            if kind == "ssubscribe":
                # The first subscription, or redis-py's resubscription after a reconnect: either
                # way what was published meanwhile is unknown.
                self._resync(node, group)
            elif kind == "smessage":
                data = self._verifier.open(group, message["data"])  # out of step too: nonces remembered
                if data is not None:
                    self._message(node, group, data)
            else:  # "sunsubscribe": the slot moved to another node (resharding, failover)
                raise ValueError(f"{group} unsubscribed by the server ({kind})")

    def _beat(self, node: _Node, now: float) -> None:
        if node.pinged is None and now - node.heard >= self._heartbeat:
            # Every bump up to the positions read now was published before the PING: its message
            # is in by the PONG, or it was lost (with no later message to show the gap).
            with self._lock:
                mine = [g for g in node.groups if self._pos.get(g) is not None]
            node.expected = _read(node.client, mine) if mine else {}
            node.pubsub.ping()
            node.pinged = now
        elif node.pinged is not None and now - node.pinged >= self._heartbeat:
            raise _Silent(f"no answer from a cluster node for {now - node.heard:.1f} s")

    def _message(self, node: _Node, group: str, data: bytes) -> None:
        mine = self._pos.get(group)
        if mine is None:
            return  # not in step yet: its confirmation comes first, then its position
        head, _, rest = data.partition(b"\x1f")
        born, dot, n = head.partition(b".")
        if not (dot and born.isdigit() and n.isdigit()):
            self._resync(node, group)  # "-": the sequence could not be kept
            return
        at = (int(born), int(n))
        if mine == (0, 0) and at[1] == 1:
            mine = (at[0], 0)  # the group's first bump since its sequence was missing
        if at[0] == mine[0] and at[1] <= mine[1]:
            return  # published before we read the position
        if at != (mine[0], mine[1] + 1):
            self._resync(node, group)
            return
        self._listener.apply(frozenset(rest.decode().split("\x1f")) if rest else frozenset())
        with self._lock:
            self._pos[group] = at

    def _resync(self, node: _Node, group: str) -> None:
        with self._lock:
            lose = self._pos.get(group) is not None and group in self._required
            self._pos[group] = None
            if lose:
                was_in_step = not self._out
                self._out.add(group)
        if lose:
            if was_in_step:
                self.resyncs += 1
            self._listener.lost()
        at = _read(node.client, [group])[group]
        with self._lock:
            new = group not in self._required
        if new:  # before it counts as followed: reads that began before are not taken
            self._listener.widened()
        with self._lock:
            self._pos[group] = at
            self._required.add(group)
            was_out = bool(self._out)
            self._out.discard(group)
            synced = was_out and not self._out
        if synced:
            self._listener.synced()
