"""From ``Cache(backend=…)`` to a Backend: the URL checked part by part, and one first contact with
Redis, so that a wrong database or URL parameter fails at start-up instead of on every request.

A Redis that is down or slow at start-up is not an error (the cache starts, and reads go to the
database until it answers); a Redis that answers "no" to the connection's own setup is.
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, Connection, parse_url

from sqlacache.backends import Backend, MemoryBackend, RedisBackend
from sqlacache.backends.redis import sentinel as sentinel_url
from sqlacache.policy import ConfigurationError

log = logging.getLogger("sqlacache")

_DB_PATH = re.compile(r"/?(\d+/?)?")


def shown(url: str) -> str:
    """The URL as messages show it: without its password."""
    if url.partition("://")[0].lower() in sentinel_url.SCHEMES:
        return sentinel_url.shown(url)
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def _accepted(connection_class: type) -> set[str]:
    """The keyword arguments a redis-py connection class takes (through its whole ``__init__`` chain)."""
    names: set[str] = set()
    for cls in connection_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return names


def check_url(url: str, shown_as: str | None = None) -> None:
    """Refuse what redis-py would ignore or fail on later: a path that isn't a database number
    (``redis://host/abc`` is silently database 0), an unknown query parameter, a bad port.
    ``shown_as``: the URL the user wrote, for the messages (a Sentinel URL's master options are
    checked as a plain URL)."""
    where = f"backend {shown(shown_as or url)!r}"
    try:
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigurationError(f"{where}: {exc}; write e.g. 'redis://host:6379/0'") from exc
    parts = urlsplit(url)
    if parts.scheme.lower() == "unix":
        if not parts.path:
            raise ConfigurationError(
                f"{where}: no socket path; write e.g. 'unix:///run/redis/redis.sock?db=0'"
            )
    elif not _DB_PATH.fullmatch(parts.path):
        raise ConfigurationError(
            f"{where}: the path {parts.path!r} is not a database number (redis-py would silently use "
            "database 0); write the number, e.g. 'redis://host:6379/0'"
        )
    accepted = _accepted(options.get("connection_class", Connection)) | set(URL_QUERY_ARGUMENT_PARSERS)
    unknown = sorted(set(options) - accepted - {"connection_class", "path", "host", "port"})
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown query parameter(s) {unknown}; the ones redis-py knows include "
            f"{sorted(URL_QUERY_ARGUMENT_PARSERS)}"
        )


def first_contact(url: str, client: redis.Redis) -> None:
    """Open one connection now. A server that refuses its setup (``SELECT`` of a database it doesn't
    have, …) is a configuration error; one that is down or slow is left to the circuit breaker."""
    pool = client.connection_pool
    sentinel = url.partition("://")[0].lower() in sentinel_url.SCHEMES
    try:
        connection = pool.get_connection()
    except redis.exceptions.AuthenticationError as exc:  # (a ConnectionError to redis-py)
        where = "the master" if sentinel else "Redis"
        raise ConfigurationError(
            f"backend {shown(url)!r}: {where} refused the credentials: {exc}; check the user and "
            "password in the URL ('redis://user:password@host:6379/0', percent-encoded"
            + (
                "; in a Sentinel URL they are the master's, the sentinels' go in "
                "'?sentinel_username=…&sentinel_password=…')"
                if sentinel
                else ")"
            )
        ) from exc
    except redis.exceptions.ResponseError as exc:
        db = pool.connection_kwargs.get("db", 0)
        fix = (
            f"database {db} does not exist on that server: use an index below its 'databases' setting "
            "(16 unless configured), e.g. 'redis://host:6379/0'"
            if "DB index" in str(exc)
            else "check the URL's database, user and password"
        )
        raise ConfigurationError(
            f"backend {shown(url)!r}: Redis refused the connection: {exc}; {fix}"
        ) from exc
    except (redis.exceptions.RedisError, OSError):
        return  # unreachable now: the cache starts anyway and reads go to the database meanwhile
    pool.release(connection)


def check_service(url: str, client: redis.Redis) -> None:
    """A Sentinel URL's service name, checked with the sentinels that answer now: a name none of
    them monitors is a configuration error (redis-py would only ever say "no master found").
    Sentinels that are down or slow are not an error."""
    pool = client.connection_pool
    manager, service = getattr(pool, "sentinel_manager", None), getattr(pool, "service_name", None)
    if manager is None or service is None:
        return
    known: set[str] = set()
    for node in manager.sentinels:
        try:
            masters = node.sentinel_masters()
        except redis.exceptions.AuthenticationError as exc:
            raise ConfigurationError(
                f"backend {shown(url)!r}: the sentinels refused the credentials: {exc}; give the "
                "sentinels' password as '?sentinel_password=…' (and user as '?sentinel_username=…'); "
                "the URL's 'user:password@' is the master's"
            ) from exc
        except (redis.exceptions.RedisError, OSError):
            continue
        if service in masters:
            return
        known.update(masters)
        break  # one sentinel that answered is enough to tell
    else:
        return  # none answered: left to the circuit breaker
    raise ConfigurationError(
        f"backend {shown(url)!r}: the sentinels monitor no service named {service!r}; "
        f"they know {sorted(known) or 'none'}: write one of those after the hosts, "
        "e.g. 'redis+sentinel://host:26379/mymaster/0'"
    )


def backend_from(spec: Any, prefix: str, socket_timeout: float, max_entries: int) -> Backend:
    if isinstance(spec, str):
        scheme = spec.partition("://")[0].lower()
        if scheme in ("memory", "mem"):
            return MemoryBackend(max_entries=max_entries)
        if scheme in sentinel_url.SCHEMES:
            check_url(sentinel_url.parse(spec).plain_url, shown_as=spec)
            backend = RedisBackend.from_url(
                spec, prefix=prefix, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
            if backend.client is not None:
                check_service(spec, backend.client)
                first_contact(spec, backend.client)
            return backend
        if scheme in ("redis+cluster", "rediss+cluster"):
            return _cluster_from_url(spec, prefix, socket_timeout)
        if scheme in ("redis", "rediss", "unix"):
            check_url(spec)
            backend = RedisBackend.from_url(
                spec, prefix=prefix, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
            if backend.client is not None:
                first_contact(spec, backend.client)
            return backend
        raise ConfigurationError(
            f"backend {shown(spec)!r}: unknown scheme {scheme!r}; use 'memory://', "
            "'redis://host:port/db', 'redis+sentinel://host:26379/service/db', "
            "'redis+cluster://host:port,host:port/', a redis-py client, "
            "or a Backend instance"
        )
    if isinstance(spec, Backend):
        return spec
    cluster = _cluster_client(spec, prefix)
    if cluster is not None:
        return cluster
    if isinstance(spec, redis.asyncio.Redis):  # fakeredis' async client subclasses it too
        return RedisBackend(async_client=spec, prefix=prefix)
    if isinstance(spec, redis.Redis) or (hasattr(spec, "evalsha") and hasattr(spec, "register_script")):
        return RedisBackend(spec, prefix=prefix)
    raise ConfigurationError(
        f"backend {spec!r} is not a URL, a redis-py client or a sqlacache Backend; "
        "pass e.g. backend='redis://localhost:6379/0' or backend='memory://'"
    )


def _cluster_from_url(url: str, prefix: str, socket_timeout: float) -> Backend:
    from sqlacache.backends.redis.cluster import RedisClusterBackend, parse_cluster_url

    # The options are a plain URL's (the same for every node): refuse those redis-py doesn't know.
    scheme, _, rest = url.partition("://")
    netloc, _, tail = rest.partition("/")
    _, q, query = tail.partition("?") if "?" not in netloc else netloc.partition("?")
    if q and query:
        plain = "rediss" if scheme.lower().startswith("rediss") else "redis"
        check_url(f"{plain}://127.0.0.1/0?{query}", shown_as=url)
    try:
        backend = RedisClusterBackend.from_url(
            url, prefix=prefix, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        nodes, kwargs = parse_cluster_url(url)
    except ValueError as exc:
        raise ConfigurationError(f"backend {shown(url)!r}: {exc}") from exc
    _cluster_first_contact(url, nodes, {"socket_timeout": socket_timeout, **kwargs})
    return backend


def _cluster_first_contact(url: str, nodes: list[tuple[str, int]], kwargs: dict[str, Any]) -> None:
    """One PING to the first node that answers, with the URL's credentials and TLS options (the
    cluster clients themselves are made on first use): a node that refuses the credentials is a
    configuration error; nodes that are down or slow are left to the circuit breaker."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options = {"socket_connect_timeout": kwargs.get("socket_timeout"), **kwargs}
    for host, port in nodes:
        probe = redis.Redis(host=host, port=port, retry=Retry(NoBackoff(), 0), **options)
        try:
            probe.ping()
            return
        except redis.exceptions.AuthenticationError as exc:  # (a ConnectionError to redis-py)
            raise ConfigurationError(
                f"backend {shown(url)!r}: the cluster node {host}:{port} refused the credentials: "
                f"{exc}; check the user and password in the URL "
                "('redis+cluster://user:password@host:port/', percent-encoded; the same on every node)"
            ) from exc
        except (redis.exceptions.RedisError, OSError):
            continue  # down, or slow: the next node, or the circuit breaker once the cache runs
        finally:
            probe.close()


def _cluster_client(spec: Any, prefix: str) -> Backend | None:
    """A redis-py cluster client (sync or asyncio) as a RedisClusterBackend, else None."""
    import redis.asyncio.cluster
    import redis.cluster

    from sqlacache.backends.redis.cluster import RedisClusterBackend

    try:
        if isinstance(spec, redis.cluster.RedisCluster):
            return RedisClusterBackend(spec, prefix=prefix)
        if isinstance(spec, redis.asyncio.cluster.RedisCluster):
            return RedisClusterBackend(async_client=spec, prefix=prefix)
    except ValueError as exc:
        raise ConfigurationError(f"backend {spec!r}: {exc}") from exc
    return None


def warn_if_unbounded(backend: Backend) -> None:
    """A Redis client that waits long on a hung server makes every read wait with it."""
    for side in ("_sync", "_async"):
        client = getattr(getattr(backend, side, None), "client", None)
        kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
        if not isinstance(kwargs, dict) or "host" not in kwargs:
            continue  # not a TCP client (fakeredis, a unix socket…)
        timeout = kwargs.get("socket_timeout")
        if timeout is None or timeout > 0.5:
            log.warning(
                "sqlacache: the Redis client's socket_timeout is %s: while Redis hangs, every read "
                "would wait that long. Pass socket_timeout=0.05 and socket_connect_timeout=0.05 to "
                "redis.Redis(...), or give Cache a URL (backend='redis://…') to get them",
                "unset" if timeout is None else f"{timeout} s",
            )
            return
        retry = kwargs.get("retry")
        retries = getattr(retry, "_retries", 0)
        supported = getattr(retry, "_supported_errors", ())
        if isinstance(retries, int) and retries > 1 and redis.exceptions.TimeoutError in supported:
            log.warning(
                "sqlacache: the Redis client retries timeouts %d times: a hung Redis would cost each "
                "read up to %d timeouts before the circuit breaker opens. Pass retry=Retry(NoBackoff(), "
                "1, supported_errors=(redis.exceptions.ConnectionError,)) to redis.Redis(...), or give "
                "Cache a URL (backend='redis://…')",
                retries,
                retries + 1,
            )
            return
