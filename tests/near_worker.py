"""Another process for the near-cache fan-out tests (tests/test_near_fanout.py).

``python -m tests.near_worker <database url> <schema or -> <redis url> <prefix>`` reads commands, one
JSON object a line, on stdin, and answers each with one JSON line on stdout once it is done (a write:
once ``commit()`` returned). Its Cache has a near-cache of its own (strict), on the same Redis and
prefix as the test's: the only way the test's process hears of its commits is Redis (the versions
and the fan-out), as between real processes.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import sessionmaker

from sqlacache import Cache, CachingSession
from tests.helpers import near_settled, wal
from tests.models import User


def main() -> None:
    url, schema, redis_url, prefix = sys.argv[1:5]
    args = {"options": f"-csearch_path={schema}"} if schema != "-" else {}
    engine = create_engine(url, connect_args=args)
    if engine.dialect.name == "sqlite":
        wal(engine)
    cache = Cache(backend=redis_url, prefix=prefix, near_cache=True)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:  # the cache watches the database from now on (Core writes evict too)
        s.get(User, 1)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        out: Any = None
        if op == "rename":  # through a caching session
            with Session() as s:
                s.get(User, cmd["id"]).name = cmd["name"]
                s.commit()
        elif op == "core":  # on an engine connection, outside any session
            with engine.begin() as conn:
                conn.execute(update(User).where(User.id == cmd["id"]).values(name=cmd["name"]))
        elif op == "name":
            with Session() as s:
                out = s.get(User, cmd["id"]).name
        elif op == "names":
            with Session() as s:
                out = [u.name for u in s.scalars(select(User).order_by(User.id))]
        elif op == "settle":
            near_settled(cache)
        elif op == "stats":
            out = {k: v for k, v in cache.stats().items() if isinstance(v, (int, float, bool))}
        elif op == "sleep":
            time.sleep(cmd["seconds"])
        print(json.dumps({"out": out}), flush=True)
    cache.close()
    engine.dispose()


if __name__ == "__main__":
    main()
