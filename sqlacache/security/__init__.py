"""What keeps a shared Redis from reading or rewriting what the cache holds (see docs/security.rst)."""
