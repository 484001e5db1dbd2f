"""The SQLAlchemy event listeners sqlacache installs process-wide, all imported (so installed) here.

Each stays next to the code it serves; a session that is not a caching one costs each a dict lookup.

=========================  ===================================  ====================================
target, event              listener                             why
=========================  ===================================  ====================================
Session do_orm_execute     read/execute.py ``_on_execute``      the read path
Mapper load                read/capture.py ``_on_load``         what a miss's objects were loaded with
Mapper after_mapper_       layout.py ``_remapped``              a class mapped anew decodes entries
constructed                                                     with its new mapper
Session before_commit      binding.py ``_before_commit``        a closed cache refuses commits
Mapper after_insert/       write/tracker.py ``_listener``       rows the unit of work wrote
update/delete
Engine after_cursor_exec.  write/tracker.py                     other statements on the connection
Session after_begin,       write/tracker.py                     per-transaction tracking; eviction
after_flush,                                                    at the outermost commit
before_commit,
after_commit,
after_transaction_end
Pool checkin               write/tracker.py ``_checkin``        a pooled connection belongs to no session
Engine begin, rollback     write/connections.py ``_drop``       writes outside any session
=========================  ===================================  ====================================
"""

from __future__ import annotations

from sqlacache import binding
from sqlacache.read import capture, execute
from sqlacache.write import connections, tracker

__all__ = ["binding", "capture", "connections", "execute", "tracker"]
