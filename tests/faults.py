"""Fault injection for the test-suite: break a real Redis, for real.

``RedisServer`` runs a throwaway ``redis-server`` on a free loopback port, in its own temporary
directory, and can pause it (SIGSTOP), kill it, restart it empty or with its data, bring it back
with an *older* snapshot, fill it until it answers OOM, start a read-only replica of it, keep it
answering ``LOADING`` for a while, and flush its scripts.

``TcpProxy`` sits between a client and a server and adds latency, swallows traffic (blackhole),
drops every open connection or refuses new ones.

Everything here uses plain sockets, threads and subprocesses; all threads are daemons, and every
``stop()`` is idempotent.
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.retry import Retry

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 10.0
# Redis's own default for loading-process-events-interval-bytes (2 MiB).
_DEFAULT_EVENTS_INTERVAL_BYTES = 2 * 1024 * 1024
# DEBUG POPULATE value size for loading(): more than the 1024 bytes of
# --loading-process-events-interval-bytes it sets.
_LOADING_VALUE_SIZE = 1100
# Arguments RedisServer manages itself; passing them as extra arguments would break it.
_MANAGED_ARGS = frozenset({"--port", "--bind", "--dir", "--dbfilename", "--daemonize", "--logfile"})


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout: float) -> str:
    """``"ready"`` (PONG), ``"loading"`` (-LOADING), ``"down"`` (no connection) or ``"silent"``."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(256)
    except (ConnectionRefusedError, ConnectionResetError):
        return "down"
    except OSError:
        return "silent"
    if reply.startswith((b"+PONG", b"-NOAUTH")):  # a server with requirepass answers, so it's up
        return "ready"
    if reply.startswith(b"-LOADING"):
        return "loading"
    return "silent"


def tls_args(cert: str, key: str, port: int) -> list[str]:
    """A server's (or sentinel's) TLS listener on ``port`` with ``cert`` (its own CA), and TLS to its
    master and replicas too; clients need no certificate of their own."""
    return [
        "--tls-port", str(port), "--tls-cert-file", cert, "--tls-key-file", key,
        "--tls-ca-cert-file", cert, "--tls-replication", "yes", "--tls-auth-clients", "no",
    ]  # fmt: skip


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


# ---------------------------------------------------------------------------------------------
# redis-server


@dataclass
class _ProcState:
    """What the finalizer needs, kept apart from the RedisServer so it can be collected."""

    directory: str
    proc: subprocess.Popen[bytes] | None = None
    log: Any = None

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a stopped process dies on SIGKILL too, but be plain
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
        if self.log is not None:
            self.log.close()
            self.log = None

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisServer:
    """A throwaway redis-server on a free loopback port, in its own temp dir; no persistence unless asked.

    The server always runs with ``--dir <tempdir> --dbfilename dump.rdb`` and, unless ``extra_args``
    say otherwise, ``--save "" --appendonly no``: it writes no file of its own accord, and a
    ``start()`` after a ``stop()`` comes up empty. The RDB files used by ``restart(keep_data=True)``,
    ``restore_snapshot_later()`` and ``loading()`` are removed again once they have been loaded.
    ``--enable-debug-command yes`` is passed at every start (``loading()`` needs DEBUG POPULATE).
    """

    def __init__(
        self, *extra_args: str, password: str | None = None, tls: tuple[str, str] | None = None
    ) -> None:
        """``password``: ``--requirepass`` and ``--masterauth`` (its replicas use the same one), and
        every client this object makes authenticates with it. ``tls=(cert, key)``: a TLS listener
        on ``tls_port`` too (the plain port stays, for the set-up), replication over TLS."""
        if password is not None:
            extra_args = (*extra_args, "--requirepass", password, "--masterauth", password)
        self.password = password
        self.tls = tls
        self.tls_port = free_port() if tls else 0
        if tls:
            extra_args = (*extra_args, *tls_args(*tls, self.tls_port))
        managed = _MANAGED_ARGS.intersection(extra_args)
        if managed:
            raise ValueError(f"RedisServer manages {sorted(managed)} itself")
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        self.exe = exe
        self.extra_args: tuple[str, ...] = extra_args
        self.port: int = free_port()
        self.url: str = f"redis://{LOOPBACK}:{self.port}/0"
        self.dir: str = tempfile.mkdtemp(prefix=f"sqlacache-redis-{self.port}-")
        self._state = _ProcState(self.dir)
        self._paused = False
        self._saved_policy: str | None = None
        self._snapshots = 0
        # Kill the process and remove the directory if the test forgets to (or crashes).
        self._finalizer = weakref.finalize(self, self._state.cleanup)

    # -- files ------------------------------------------------------------------------------------

    @property
    def rdb_path(self) -> str:
        return os.path.join(self.dir, "dump.rdb")

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "redis.log")

    def _remove_rdb(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.rdb_path)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- process ----------------------------------------------------------------------------------

    def _argv(self, one_off: tuple[str, ...]) -> list[str]:
        return [
            self.exe,
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            "--dir",
            self.dir,
            "--dbfilename",
            "dump.rdb",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
            # Full syncs to a replica start at once instead of waiting 5 s for more replicas.
            "--repl-diskless-sync-delay",
            "0",
            *self.extra_args,
            *one_off,
        ]

    def _spawn(self, one_off: tuple[str, ...] = (), accept_loading: bool = False) -> str:
        """Start the process, wait until PING gets PONG (or LOADING if ``accept_loading``)."""
        self._state.kill()
        self._paused = False
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed by _ProcState.kill
        self._state.log = log
        self._state.proc = subprocess.Popen(
            self._argv(one_off),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,  # a Ctrl-C aimed at pytest must not reach redis-server
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            proc = self._state.proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                self._state.kill()
                raise RuntimeError(f"redis-server on port {self.port} exited ({code}):\n{self._log_tail()}")
            status = _ping(self.port, timeout=1.0)
            if status == "ready" or (status == "loading" and accept_loading):
                return status
            time.sleep(0.01)
        self._state.kill()
        raise RuntimeError(
            f"redis-server on port {self.port} did not answer PING within {START_TIMEOUT} s:\n"
            f"{self._log_tail()}"
        )

    def _wait_loaded(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _ping(self.port, timeout=1.0) == "ready":
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} still not ready after {timeout} s")

    @property
    def running(self) -> bool:
        proc = self._state.proc
        return proc is not None and proc.poll() is None

    def start(self) -> None:
        """Spawn the server and wait until PING answers (10 s at most); nothing if it runs already."""
        if self.running:
            return
        persistent = any(a in ("--save", "--appendonly") for a in self.extra_args)
        if not persistent:
            self._remove_rdb()
        self._spawn()

    def stop(self) -> None:
        """Kill the server (SIGCONT, SIGKILL) and wait for it; its data is lost. Idempotent."""
        self._state.kill()
        self._paused = False

    kill = stop

    def close(self) -> None:
        """``stop()`` and remove the temporary directory (the object is unusable afterwards)."""
        self._finalizer()

    def restart(self, keep_data: bool = False) -> None:
        """Kill and start again: empty, or (``keep_data``) from an RDB snapshot taken just before.

        A stopped server just starts (empty: there is nothing to keep).
        """
        if keep_data and self.running:
            self.resume()
            with self._admin() as r:
                self._save(r)
            self.stop()
            try:
                self._spawn()
            finally:
                self._remove_rdb()
        else:
            self.stop()
            self._remove_rdb()
            self._spawn()

    def restore_snapshot_later(self) -> Callable[[], None]:
        """SAVE now; the returned function restarts the server from *that* snapshot.

        Whatever was written in between is lost: "Redis came back with older data".
        The function can be called more than once.
        """
        self.resume()
        with self._admin() as r:
            self._save(r)
        self._snapshots += 1
        snapshot = os.path.join(self.dir, f"snapshot-{self._snapshots}.rdb")
        os.replace(self.rdb_path, snapshot)

        def restore() -> None:
            self.stop()
            shutil.copyfile(snapshot, self.rdb_path)
            try:
                self._spawn()
            finally:
                self._remove_rdb()

        return restore

    # -- SIGSTOP ----------------------------------------------------------------------------------

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers."""
        proc = self._state.proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError("redis-server is not running")
        proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT (nothing if not running or not paused)."""
        proc = self._state.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    # -- clients and commands ---------------------------------------------------------------------

    def client(self, **kw: Any) -> redis.Redis:
        """A ``redis.Redis`` on this server: ``socket_timeout=2`` and *no retries* unless given.

        (redis-py >= 6 retries connection errors and timeouts 10 times by default, which would hide
        the very faults the tests inject; pass ``retry=`` to get that back.)
        """
        options: dict[str, Any] = {
            "socket_timeout": 2,
            "socket_connect_timeout": kw.get("socket_timeout", 2),
            "retry": _no_retry(),
            "password": self.password,
        }
        options.update(kw)
        return redis.Redis(host=LOOPBACK, port=self.port, db=0, **options)

    @contextlib.contextmanager
    def _admin(self, timeout: float = 30) -> Iterator[redis.Redis]:
        client = self.client(socket_timeout=timeout, socket_connect_timeout=5)
        try:
            yield client
        finally:
            client.close()

    def _save(self, r: redis.Redis, timeout: float = START_TIMEOUT) -> None:
        """SAVE, waiting first for a background save (a full sync to a replica forks one) to end."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                r.save()
                return
            except ResponseError as e:
                if "in progress" not in str(e) or time.monotonic() > deadline:
                    raise
            time.sleep(0.02)

    def flushall(self) -> None:
        with self._admin() as r:
            r.flushall()

    def script_flush(self) -> None:
        with self._admin() as r:
            r.script_flush()

    # -- OOM --------------------------------------------------------------------------------------

    def fill_until_oom(self, maxmemory: str = "4mb") -> None:
        """Limit memory (noeviction) and write ``filler:*`` keys until a write fails with OOM.

        Afterwards every write command fails with ``OutOfMemoryError`` until ``clear_oom()``. Used
        memory hovers right at the limit once full (a client's buffers count too), so the limit is
        finally lowered 256 KiB below what is in use: a client disconnecting and freeing its buffers
        must not let writes through again.
        """
        value = b"x" * 16384
        with self._admin() as r:
            if self._saved_policy is None:
                self._saved_policy = str(r.config_get("maxmemory-policy")["maxmemory-policy"])
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", maxmemory)
            limit = int(str(r.config_get("maxmemory")["maxmemory"]))
            if limit <= 0:
                raise ValueError(f"maxmemory {maxmemory!r} is no limit")
            budget = 2 * limit + 64 * 1024 * 1024
            written = 0
            batch = 0
            while True:
                pipe = r.pipeline(transaction=False)
                for i in range(8):
                    pipe.set(f"filler:{batch}:{i}", value)
                for result in pipe.execute(raise_on_error=False):
                    if isinstance(result, Exception) and not isinstance(result, OutOfMemoryError):
                        raise result
                try:
                    r.set(f"filler:{batch}:probe", b"x")
                except OutOfMemoryError:
                    break
                written += 8 * len(value)
                batch += 1
                if written > budget:
                    raise RuntimeError(f"wrote {written} bytes under maxmemory {maxmemory} without an OOM")
            used = int(r.info("memory")["used_memory"])
            r.config_set("maxmemory", max(1, min(limit, used - 256 * 1024)))
            try:
                r.set("filler:probe", b"x")
            except OutOfMemoryError:
                return
            raise RuntimeError("Redis answered OOM once but accepts writes again")

    def clear_oom(self) -> None:
        """No memory limit again (and the previous eviction policy); the filler keys deleted."""
        with self._admin() as r:
            r.config_set("maxmemory", 0)
            if self._saved_policy is not None:
                r.config_set("maxmemory-policy", self._saved_policy)
                self._saved_policy = None
            keys: list[bytes] = []
            for key in r.scan_iter(match="filler:*", count=1000):
                keys.append(key)
                if len(keys) >= 1000:
                    r.unlink(*keys)
                    keys.clear()
            if keys:
                r.unlink(*keys)

    # -- replica ----------------------------------------------------------------------------------

    def replica(self) -> RedisServer:
        """Start another RedisServer replicating this one; returns once the link is up.

        Writes to it raise ``ReadOnlyError``. The caller stops it (``close()`` also removes its dir).
        """
        port = self.tls_port if self.tls else self.port  # a TLS replica replicates over TLS
        rep = RedisServer("--replicaof", LOOPBACK, str(port), password=self.password, tls=self.tls)
        try:
            rep.start()
            deadline = time.monotonic() + START_TIMEOUT
            with rep._admin(timeout=2) as r:
                while time.monotonic() < deadline:
                    info = r.info("replication")
                    if info.get("master_link_status") == "up":
                        return rep
                    time.sleep(0.02)
            raise RuntimeError(f"replica of port {self.port} did not sync within {START_TIMEOUT} s")
        except BaseException:
            rep.close()
            raise

    # -- LOADING ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def loading(self, seconds: float = 2.0) -> Iterator[None]:
        """Restart the server so that it answers ``LOADING`` (BusyLoadingError) for about ``seconds``.

        The current data plus ``max(2000, seconds * 1000)`` DEBUG POPULATE keys of 1100 bytes are
        saved uncompressed, and the server restarts with the hidden ``--key-load-delay <usec>``
        (Redis >= 6.2, checked on 7.0.15: microseconds slept after each key loaded, here
        ``seconds / keys``) and ``--loading-process-events-interval-bytes 1024`` (instead of 2 MiB),
        so that it serves clients -- with ``-LOADING`` -- after every key, i.e. within ~1 ms.
        Entering returns once a PING got ``-LOADING``; leaving waits until the load is over, then
        FLUSHALLs and restores the config. The old data is gone either way.
        """
        if seconds <= 0:
            raise ValueError("seconds must be > 0")
        self.resume()
        self.start()
        count = max(2000, int(seconds * 1000))  # a per-key delay of 1 ms at most
        with self._admin() as r:
            # Values larger than loading-process-events-interval-bytes, saved uncompressed: Redis
            # serves clients after every key, so a LOADING reply comes within a millisecond or so.
            r.execute_command("DEBUG", "POPULATE", count, "loading:", _LOADING_VALUE_SIZE)
            keys = int(r.dbsize())
            compression = str(r.config_get("rdbcompression")["rdbcompression"])
            r.config_set("rdbcompression", "no")
            try:
                self._save(r)
            finally:
                r.config_set("rdbcompression", compression)
        delay_us = max(1, int(seconds * 1_000_000 / keys))
        self.stop()
        try:
            status = self._spawn(
                ("--key-load-delay", str(delay_us), "--loading-process-events-interval-bytes", "1024"),
                accept_loading=True,
            )
            if status != "loading":
                raise RuntimeError("redis-server finished loading before it was seen answering LOADING")
            yield
        finally:
            if self.running:
                self.resume()
                self._wait_loaded(timeout=seconds * 3 + START_TIMEOUT)
                self._remove_rdb()
                with self._admin() as r:
                    r.config_set("key-load-delay", 0)
                    r.config_set("loading-process-events-interval-bytes", _DEFAULT_EVENTS_INTERVAL_BYTES)
                    r.flushall()
            else:
                self._remove_rdb()

    def __repr__(self) -> str:
        state = "paused" if self._paused else "running" if self.running else "stopped"
        return f"<RedisServer {self.url} {state}>"


# ---------------------------------------------------------------------------------------------
# Sentinel: a master, a replica and three sentinels


class SentinelServer:
    """A ``redis-server <conf> --sentinel`` on a free loopback port, in its own temporary directory,
    monitoring ``service`` at ``master_port`` (quorum ``quorum``, fast failure detection)."""

    def __init__(
        self,
        service: str,
        master_port: int,
        quorum: int = 2,
        down_after_ms: int = 400,
        failover_timeout_ms: int = 2000,
        *,
        auth_pass: str | None = None,
        password: str | None = None,
        tls: tuple[str, str] | None = None,
    ) -> None:
        """``auth_pass``: the password of the monitored servers; ``password``: the sentinel's own
        (``requirepass``, which it also uses with the other sentinels)."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        self.exe = exe
        self.service = service
        self.port = free_port()
        self.tls_port = free_port() if tls else 0
        self.dir = tempfile.mkdtemp(prefix=f"sqlacache-sentinel-{self.port}-")
        self.conf = os.path.join(self.dir, "sentinel.conf")
        with open(self.conf, "w") as f:
            f.write(
                f"port {self.port}\n"
                f"bind {LOOPBACK}\n"
                f"dir {self.dir}\n"
                f"sentinel monitor {service} {LOOPBACK} {master_port} {quorum}\n"
                f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {service} 1\n"
            )
            if auth_pass is not None:
                f.write(f"sentinel auth-pass {service} {auth_pass}\n")
            if password is not None:
                f.write(f"requirepass {password}\n")
            if tls:  # clients on tls_port; TLS to the servers and the other sentinels too
                args = tls_args(*tls, self.tls_port)
                f.writelines(f"{name[2:]} {value}\n" for name, value in zip(args[::2], args[1::2]))
        self.password = password
        self._state = _ProcState(self.dir)
        self._finalizer = weakref.finalize(self, self._state.cleanup)

    def start(self) -> None:
        self._state.kill()
        log = open(os.path.join(self.dir, "sentinel.log"), "ab")  # noqa: SIM115 - closed by _ProcState
        self._state.log = log
        self._state.proc = subprocess.Popen(
            [self.exe, self.conf, "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if _ping(self.port, timeout=1.0) == "ready":
                return
            time.sleep(0.01)
        raise RuntimeError(f"redis-sentinel on port {self.port} did not answer PING")

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=LOOPBACK, port=self.port, socket_timeout=2, retry=_no_retry(), password=self.password
        )

    def master(self) -> dict[str, Any]:
        """What this sentinel says of the service's master (``SENTINEL MASTERS``)."""
        with contextlib.closing(self.client()) as r:
            state: dict[str, Any] = r.sentinel_masters().get(self.service, {})
            return state

    def close(self) -> None:
        self._finalizer()


class SentinelTopology:
    """A master and a replica (RedisServer) and three sentinels monitoring them as ``service``
    (quorum 2), all on loopback. ``url`` is the ``redis+sentinel://`` URL of the service (db 0).

    ``failover()`` SIGKILLs the current master and waits until every sentinel names the replica
    as the new master (a few seconds); the old master stays down (``heal()`` starts it again as a
    replica of the new one, and waits until the sentinels count it as a replica again).
    """

    def __init__(
        self,
        service: str = "sqlacache",
        down_after_ms: int = 400,
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
        tls: tuple[str, str] | None = None,
    ) -> None:
        """``password``: the master's and replica's ``requirepass``/``masterauth`` (and the
        sentinels' ``auth-pass``); ``sentinel_password``: the sentinels' ``requirepass``.
        ``tls=(cert, key)``: every server and sentinel also listens with TLS, the sentinels watch
        the servers' TLS ports (so they name those to clients), and ``tls_url`` is the
        ``rediss+sentinel://`` URL."""
        self.service = service
        self.password = password
        self.sentinel_password = sentinel_password
        self.tls = tls
        self.master = RedisServer(password=password, tls=tls)
        self.replica: RedisServer | None = None
        self.sentinels: list[SentinelServer] = []
        self._down_after_ms = down_after_ms

    @property
    def url(self) -> str:
        hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    @property
    def tls_url(self) -> str:
        """``rediss+sentinel://`` to the sentinels' TLS ports, trusting the topology's certificate."""
        assert self.tls is not None
        hosts = ",".join(f"{LOOPBACK}:{s.tls_port}" for s in self.sentinels)
        return f"rediss+sentinel://{hosts}/{self.service}/0?ssl_ca_certs={quote(self.tls[0], safe='')}"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(LOOPBACK, s.port) for s in self.sentinels]

    def start(self) -> None:
        try:
            self.master.start()
            self.replica = self.master.replica()
            for _ in range(3):
                sentinel = SentinelServer(
                    self.service,
                    self.master.tls_port if self.tls else self.master.port,
                    2,
                    self._down_after_ms,
                    auth_pass=self.password,
                    password=self.sentinel_password,
                    tls=self.tls,
                )
                self.sentinels.append(sentinel)
                sentinel.start()
            self._wait(lambda m: m.get("num-other-sentinels") == 2 and m.get("num-slaves", 0) >= 1)
        except BaseException:
            self.close()
            raise

    def _wait(self, ready: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        states: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            states = []
            for s in self.sentinels:
                try:
                    states.append(s.master())
                except redis.RedisError:
                    states.append({})
            if all(ready(m) for m in states):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the sentinels did not agree in {timeout} s: {states}")

    def failover(self, timeout: float = 20.0) -> float:
        """Kill the master (SIGKILL); return once every sentinel names the replica as the master
        and the replica says it is one. Returns how long that took."""
        assert self.replica is not None
        started = time.monotonic()
        old, new = self.master, self.replica
        old.kill()
        self.wait_promoted(new, timeout)
        self.master, self.replica = new, old
        return time.monotonic() - started

    def wait_promoted(self, new: RedisServer, timeout: float = 20.0) -> None:
        port = new.tls_port if self.tls else new.port
        self._wait(
            lambda m: int(m.get("port", 0)) == port and m.get("is_master") and not m.get("is_sdown"),
            timeout,
        )
        deadline = time.monotonic() + timeout
        with new._admin(timeout=2) as r:
            while r.info("replication").get("role") != "master":
                if time.monotonic() > deadline:
                    raise RuntimeError("the promoted replica still says it is a replica")
                time.sleep(0.02)

    def close(self) -> None:
        for s in self.sentinels:
            s.close()
        for server in (self.master, self.replica):
            if server is not None:
                server.close()


# ---------------------------------------------------------------------------------------------
# TCP proxy


@dataclass(eq=False)
class _Link:
    """One proxied connection: a client socket, an upstream socket, four pump threads."""

    proxy: TcpProxy
    client: socket.socket
    upstream: socket.socket | None = None
    closed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    to_upstream: queue.SimpleQueue[tuple[float, bytes] | None] = field(default_factory=queue.SimpleQueue)
    to_client: queue.SimpleQueue[tuple[float, bytes] | None] = field(default_factory=queue.SimpleQueue)

    def shutdown(self) -> None:
        """Close both directions now (wakes every pump); the sockets are closed by ``run``."""
        with self.lock:
            self.closed.set()
            for s in (self.client, self.upstream):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
        self.to_upstream.put(None)
        self.to_client.put(None)

    def run(self) -> None:
        try:
            try:
                upstream = socket.create_connection((self.proxy.target_host, self.proxy.target_port), 5)
            except OSError:
                return  # the server is down: the client sees its connection closed
            upstream.settimeout(None)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.upstream = upstream
                dropped = self.closed.is_set()
            if dropped:
                return
            pumps = [
                threading.Thread(target=self._read, args=(self.client, self.to_upstream), daemon=True),
                threading.Thread(target=self._read, args=(upstream, self.to_client), daemon=True),
                threading.Thread(target=self._write, args=(self.to_upstream, upstream), daemon=True),
            ]
            for t in pumps:
                t.start()
            self._write(self.to_client, self.client)
            for t in pumps:
                t.join()
        finally:
            self.shutdown()
            for s in (self.client, self.upstream):
                if s is not None:
                    s.close()
            self.proxy._forget(self)

    def _read(self, src: socket.socket, out: queue.SimpleQueue[tuple[float, bytes] | None]) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                out.put(None)  # delivered after what is queued: a server's last words reach the client
                return
            if self.proxy._blackhole or (self.proxy._mute_server and src is self.upstream):
                continue
            out.put((time.monotonic() + self.proxy._latency, data))

    def _write(self, q: queue.SimpleQueue[tuple[float, bytes] | None], dst: socket.socket) -> None:
        while True:
            item = q.get()
            if item is None or self.closed.is_set():
                self.shutdown()
                return
            due, data = item
            while (left := due - time.monotonic()) > 0:
                if self.closed.wait(left):
                    return
            if self.proxy._blackhole:
                continue
            try:
                dst.sendall(data)
            except OSError:
                self.shutdown()
                return


class TcpProxy:
    """A threaded TCP proxy on a free loopback port in front of target_port, for latency and drops.

    - ``set_latency(s)``: every chunk is delivered ``s`` seconds after it was read, in each
      direction (a request/response round trip takes at least ``2 * s`` longer);
    - ``blackhole()``: connections are accepted and read, but whatever is read (or still queued)
      is discarded, in both directions: nothing sent while the blackhole is on ever reaches the
      server or the client, even after ``heal()``. A client waits until its own timeout;
    - ``mute_server()``: what the server sends is read and discarded (the client's requests still
      reach the server), connections stay open: a stretch of replies and published messages lost
      as if the network ate them, without the connection noticing. Discards whole chunks as read
      (a pub/sub message, written at once by the server, goes whole or not at all);
    - ``drop()``: every open connection is closed (FIN to both sides) now; new ones work;
    - ``refuse()``: the listening socket is closed, connects get "connection refused"; open
      connections are left alone. ``refuse(False)`` listens on the same port again.
    """

    def __init__(self, target_port: int, target_host: str = LOOPBACK) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port: int = free_port()
        self.url: str = f"redis://{LOOPBACK}:{self.port}/0"
        self._latency = 0.0
        self._blackhole = False
        self._mute_server = False
        self._refusing = False
        self._stopping = False
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wanted = 0  # generation of the listener state asked for ...
        self._applied = 0  # ... and the one the accept thread has put in place
        self._listen_error: OSError | None = None
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        # Listen in the caller's thread, so that a bind error raises here.
        listener = None if self._refusing else self._listen()
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(
            target=self._serve, args=(listener,), name=f"TcpProxy:{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join(5)
        self._thread = None
        self.drop()
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_r = self._wake_w = None

    # -- faults -----------------------------------------------------------------------------------

    def set_latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._latency = float(seconds)

    def blackhole(self, on: bool = True) -> None:
        self._blackhole = on

    def mute_server(self, on: bool = True) -> None:
        self._mute_server = on

    def drop(self) -> None:
        """Close every current connection, both sides, and wait (2 s at most) until they are gone."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.shutdown()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            with self._lock:
                if not any(link in self._links for link in links):
                    return
            time.sleep(0.005)

    def refuse(self, on: bool = True) -> None:
        """Close (``on``) or reopen the listening socket; returns once that is done."""
        with self._changed:
            self._refusing = on
            self._wanted += 1
            wanted = self._wanted
        if self._thread is None:
            return
        self._wake()
        with self._changed:
            if not self._changed.wait_for(lambda: self._applied >= wanted, timeout=5):
                raise RuntimeError("the proxy did not apply refuse() in time")
            error, self._listen_error = self._listen_error, None
        if error is not None:
            raise error

    def heal(self) -> None:
        self.set_latency(0)
        self.blackhole(False)
        self.mute_server(False)
        self.refuse(False)

    # -- internals --------------------------------------------------------------------------------

    def _listen(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((LOOPBACK, self.port))
            s.listen(128)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(True)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(self, conn)
            with self._lock:
                self._links.add(link)
            threading.Thread(target=link.run, name=f"TcpProxy:{self.port}:link", daemon=True).start()

    def _serve(self, first: socket.socket | None) -> None:
        """The accept thread; the only one that touches the listening socket after start()."""
        assert self._wake_r is not None
        listener = first
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            if first is not None:
                sel.register(first, selectors.EVENT_READ)
            try:
                while not self._stopping:
                    with self._changed:
                        refusing, wanted = self._refusing, self._wanted
                    if refusing and listener is not None:
                        sel.unregister(listener)
                        listener.close()
                        listener = None
                    elif not refusing and listener is None:
                        try:
                            listener = self._listen()
                            sel.register(listener, selectors.EVENT_READ)
                        except OSError as e:
                            with self._changed:
                                self._listen_error = e
                    with self._changed:
                        self._applied = max(self._applied, wanted)
                        self._changed.notify_all()
                    for key, _ in sel.select(timeout=0.5):
                        if key.fileobj is self._wake_r:
                            with contextlib.suppress(OSError):
                                while self._wake_r.recv(4096):
                                    pass
                        elif listener is not None:
                            self._accept(listener)
            finally:
                if listener is not None:
                    listener.close()

    def __repr__(self) -> str:
        return f"<TcpProxy {LOOPBACK}:{self.port} -> {self.target_host}:{self.target_port}>"
