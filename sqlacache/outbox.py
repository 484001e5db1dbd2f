"""Public path of the outbox table (``sqlacache.outbox.table``, documented).

The outbox itself is :mod:`sqlacache.resilience.outbox`.
"""

from sqlacache.resilience.outbox import table

__all__ = ["table"]
