"""``redis+sentinel://`` URLs: the master of a Sentinel-managed service, found through its sentinels.

``redis+sentinel://[user:password@]host[:port][,host[:port]…]/<service>[/<db>][?options]``

- the hosts are the sentinels (port 26379 unless given), tried in order;
- ``user:password`` authenticate to the Redis master (and its replicas once promoted), not to the
  sentinels: ``?sentinel_username=…&sentinel_password=…`` do that;
- ``rediss+sentinel://`` speaks TLS to the master and to the sentinels; the ``ssl_*`` options
  (``ssl_cert_reqs``, ``ssl_ca_certs``, …) apply to both;
- the other options are redis-py's URL options (``socket_timeout``, …), for the master.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

from redis.connection import SSLConnection, parse_url

from sqlacache.policy import ConfigurationError

SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_PORT = 26379
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_EXAMPLE = "'redis+sentinel://host:26379,host2:26379/mymaster/0'"


@dataclass
class SentinelSpec:
    """What a ``redis+sentinel://`` URL says."""

    sentinels: list[tuple[str, int]]
    service: str
    master_kwargs: dict[str, Any] = field(default_factory=dict)  # for master_for(...)
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)  # for the sentinel connections
    plain_url: str = ""  # the master's options as a redis:// URL (for check_url)


def shown(url: str) -> str:
    """The URL without its passwords."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    user, at, hosts = netloc.rpartition("@")
    if at and ":" in user:
        netloc = user.split(":", 1)[0] + ":***@" + hosts
    tail_path, q, query = tail.partition("?")
    if q:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if "password" in k else v) for k, v in pairs], safe="*")
    return f"{scheme}{sep}{netloc}{slash}{tail_path}{q}{query}"


def parse(url: str) -> SentinelSpec:
    """Check ``url`` part by part; a wrong part is a ConfigurationError that says how to fix it."""
    where = f"backend {shown(url)!r}"
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigurationError(f"{where}: not a Sentinel URL; write e.g. {_EXAMPLE}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    if not at:
        hostlist, userinfo = netloc, ""
    sentinels: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        host, colon, port_text = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host:
            raise ConfigurationError(
                f"{where}: no sentinel host{' in ' + repr(item) if item else ''}; list the sentinels "
                f"as host:port separated by commas, e.g. {_EXAMPLE}"
            )
        port = DEFAULT_PORT
        if colon:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ConfigurationError(
                    f"{where}: sentinel port {port_text!r} is not a port number; e.g. {_EXAMPLE}"
                )
            port = int(port_text)
        sentinels.append((host.strip("[]"), port))
    parts = path.split("/")
    service = unquote(parts[0]) if parts else ""
    if not service:
        raise ConfigurationError(
            f"{where}: no service name (the name the sentinels monitor the master under); "
            f"write it after the hosts, e.g. {_EXAMPLE}"
        )
    db_text = parts[1] if len(parts) > 1 else ""
    if (len(parts) > 2 and any(parts[2:])) or (db_text and not db_text.isdigit()):
        raise ConfigurationError(
            f"{where}: {'/'.join(parts[1:])!r} is not a database number; write "
            f"'/<service>/<db>', e.g. {_EXAMPLE}"
        )
    options = parse_qsl(query, keep_blank_values=True)
    sentinel_kwargs: dict[str, Any] = {}
    master_query = []
    for key, value in options:
        if key in _SENTINEL_OPTIONS:
            sentinel_kwargs[key[len("sentinel_") :]] = unquote(value)
        else:
            master_query.append((key, value))
    plain = "rediss" if scheme == "rediss+sentinel" else "redis"
    host, port = sentinels[0]
    plain_url = f"{plain}://{userinfo}{at}{host}:{port}/{db_text or 0}"
    if master_query:
        plain_url += "?" + urlencode(master_query)
    try:
        master: dict[str, Any] = parse_url(plain_url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigurationError(f"{where}: {exc}; write e.g. {_EXAMPLE}") from exc
    for key in ("host", "port", "path"):
        master.pop(key, None)
    if master.pop("connection_class", None) is SSLConnection:
        master["ssl"] = True
        sentinel_kwargs["ssl"] = True
        for key, value in master.items():
            if key.startswith("ssl_"):
                sentinel_kwargs[key] = value
    return SentinelSpec(sentinels, service, master, sentinel_kwargs, plain_url)
