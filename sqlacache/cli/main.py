"""Parse the command line and run one command; failures become a message on stderr and an exit code."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import redis

from sqlacache.cli import doctor, invalidate, keys
from sqlacache.cli.server import DEFAULT_URL, OK, UNREACHABLE, URL_ENV, Failed, check_prefix, connect

EPILOG = f"""exit codes: 0 ok; 1 the command found a problem (doctor's advice, no such key);
2 wrong command line; 3 Redis unreachable or failing. --url defaults to ${URL_ENV}, else {DEFAULT_URL}."""


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m sqlacache",
        description="Check, inspect and evict a sqlacache cache in Redis.",
        epilog=EPILOG,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"Redis URL (default: ${URL_ENV} or {DEFAULT_URL})")
    common.add_argument("--prefix", default="sqlacache", help="the Cache's prefix (default: sqlacache)")
    common.add_argument("--timeout", type=float, default=2.0, help="seconds per Redis call (default: 2)")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("ping", parents=[common], help="is Redis there: PONG, version, round trip")
    commands.add_parser(
        "doctor", parents=[common], help="connectivity, version, maxmemory-policy and persistence advice"
    )
    stats = commands.add_parser(
        "stats", parents=[common], help="what the prefix holds, and the server's counters"
    )
    stats.add_argument("--json", action="store_true", help="print JSON")
    inv = commands.add_parser(
        "invalidate", parents=[common], help="evict a table's cached reads, or everything"
    )
    which = inv.add_mutually_exclusive_group(required=True)
    which.add_argument("--table", action="append", metavar="TABLE", help="a table name (repeat for more)")
    which.add_argument("--all", action="store_true", help="everything under the prefix")
    inspect = commands.add_parser(
        "inspect", parents=[common], help="one entry: its dependencies, validity, payload"
    )
    inspect.add_argument(
        "key", metavar="KEY", help="the key with its prefix (as redis-cli --scan shows it) or without"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.timeout <= 0:
        print(
            f"python -m sqlacache: --timeout {args.timeout}: give a positive number of seconds",
            file=sys.stderr,
        )
        return 2
    try:
        if args.command == "invalidate":  # through a Cache: whatever URL a Cache takes
            url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
            prefix = check_prefix(args.prefix)
            return invalidate.run_invalidate(url, prefix, args.table or [], args.all, args.timeout)
        target = connect(args.url, args.prefix, args.timeout)
        try:
            if args.command == "ping":
                return doctor.run_ping(target)
            if args.command == "doctor":
                return doctor.run_doctor(target)
            if args.command == "stats":
                return keys.run_stats(target, args.json)
            return keys.run_inspect(target, args.key, args.json)
        finally:
            target.client.close()
    except Failed as exc:
        print(f"python -m sqlacache {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except redis.exceptions.RedisError as exc:
        print(f"python -m sqlacache {args.command}: Redis failed: {exc}", file=sys.stderr)
        return UNREACHABLE
    return OK  # pragma: no cover - every command returns above
