"""Public path of the outbox table (``sqlacache.outbox.table``, documented).

The outbox itself is :mod:`sqlacache.write.outbox`.
"""

from sqlacache.write.outbox import table

__all__ = ["table"]
