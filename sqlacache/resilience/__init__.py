"""Between the cache and its backend: every call returns, whatever the backend does."""
