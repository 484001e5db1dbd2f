"""A throwaway Redis Cluster: three masters from ``redis-server --cluster-enabled yes`` on free
loopback ports (slots assigned with CLUSTER ADDSLOTSRANGE, nodes joined with CLUSTER MEET), and
optionally a replica of each (CLUSTER REPLICATE): servers ``masters + i`` replicate master ``i``."""

from __future__ import annotations

import os
import subprocess
import time
from urllib.parse import quote

import redis

from tests.faults import LOOPBACK, RedisServer, free_port


def _state_ok(client: redis.Redis) -> bool:
    info = client.execute_command("CLUSTER", "INFO")  # parsed to a dict, or not, by redis-py version
    if isinstance(info, dict):
        return bool(info.get("cluster_state") in ("ok", b"ok"))
    return b"cluster_state:ok" in info


def make_tls_files(directory: str) -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1 (its own CA) and its key, made by ``openssl``
    in ``directory``: ``(cert, key)``. Clients trust it with ``ssl_ca_certs=<cert>``."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-addext", "basicConstraints=critical,CA:TRUE",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class RedisClusterProcs:
    """``password``: every node's ``requirepass`` and ``masterauth`` (``url`` carries it).
    ``tls=(cert, key)``: each node also listens with TLS on ``tls_ports[i]`` and its cluster bus and
    replication speak TLS (``tls-cluster``): a TLS client is then sent to the TLS ports, a plain one
    (the set-up here) to the plain ones."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 3000,
        tls: tuple[str, str] | None = None,
        password: str | None = None,
    ) -> None:
        self.masters = masters
        self.password = password
        self.tls = tls
        count = masters * (1 + replicas)
        self.bus_ports = [free_port() for _ in range(count)]
        self.tls_ports = [free_port() for _ in range(count)] if tls else []
        tls_args: list[list[str]] = [
            [
                "--tls-port", str(port), "--tls-cert-file", tls[0], "--tls-key-file", tls[1],
                "--tls-ca-cert-file", tls[0], "--tls-cluster", "yes", "--tls-replication", "yes",
                "--tls-auth-clients", "no",
            ]
            for port in self.tls_ports
        ] if tls else [[] for _ in range(count)]  # fmt: skip
        self.servers = [
            RedisServer(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                # Its own free bus port: port + 10000 may not exist for a high free port.
                "--cluster-port",
                str(bus),
                "--cluster-node-timeout",
                str(node_timeout_ms),
                # A replica fails over however long it was cut off from its master (the tests cut it).
                "--cluster-replica-validity-factor",
                "0",
                *extra,
                password=password,
            )
            for bus, extra in zip(self.bus_ports, tls_args)
        ]

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def url(self) -> str:
        if self.tls:
            nodes = ",".join(f"{LOOPBACK}:{p}" for p in self.tls_ports)
            return f"rediss+cluster://{nodes}/?ssl_ca_certs={quote(self.tls[0], safe='')}"
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis+cluster://{auth}" + ",".join(f"{LOOPBACK}:{p}" for p in self.ports) + "/"

    def node(self, i: int) -> redis.Redis:
        return redis.Redis(LOOPBACK, self.servers[i].port, password=self.password)

    def node_id(self, i: int) -> str:
        client = self.node(i)
        try:
            reply = client.execute_command("CLUSTER", "MYID")
            return reply.decode() if isinstance(reply, bytes) else str(reply)
        finally:
            client.close()

    def start(self, timeout: float = 20.0) -> None:
        for server in self.servers:
            server.start()
        n = self.masters
        per = 16384 // n
        clients = [self.node(i) for i in range(len(self.servers))]
        try:
            for i, client in enumerate(clients[:n]):
                last = 16383 if i == n - 1 else (i + 1) * per - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
            for client in clients[1:]:
                client.execute_command("CLUSTER", "MEET", LOOPBACK, self.servers[0].port, self.bus_ports[0])
            ids = [self.node_id(i) for i in range(n)]
            for j, client in enumerate(clients[n:]):
                master = ids[j % n]
                deadline = time.monotonic() + timeout
                while True:  # the replica must know the master's node id first
                    try:
                        client.execute_command("CLUSTER", "REPLICATE", master)
                        break
                    except redis.ResponseError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
            deadline = time.monotonic() + timeout
            while True:
                ok = all(_state_ok(c) and len(c.execute_command("CLUSTER", "SLOTS")) == n for c in clients)
                if ok and len(clients) > n:
                    ok = all(c.info("replication").get("master_link_status") == "up" for c in clients[n:])
                if ok:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError("the test Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def flushall(self) -> None:
        for i in range(self.masters):
            client = self.node(i)
            try:
                client.flushall()
            finally:
                client.close()

    def close(self) -> None:
        for server in self.servers:
            server.close()
