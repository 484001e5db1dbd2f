"""The operators' command line, ``python -m sqlacache``: check, inspect and evict a Redis cache."""
