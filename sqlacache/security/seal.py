"""Signed (and optionally encrypted) cache entries: sealed on store, checked on every lookup.

An entry is sealed over the prefix and the key it is stored under and its bytes, so an entry that
was altered, truncated, written by something without the secret, or copied under another key (or
another prefix) fails the check. ``Resilient`` (resilience/resilient.py) seals and opens every
entry at its one seam above the backends, so memory, Redis and Redis Cluster all get it; without a
secret or key it does no work at all.

Formats (``inner`` is the unsealed envelope ``b"\\xa7q" + refresh time + codec payload``):

* signed: ``b"\\xa7s" + tag + inner``, tag = HMAC-SHA256 over ``prefix \\x1f key \\x1f inner``;
* encrypted: ``b"\\xa7e" + nonce + AES-256-GCM(inner)`` with ``prefix \\x1f key`` as associated
  data (GCM's tag authenticates the entry: no separate signature is needed).

Rotation: the first secret (or key) seals, any of them opens.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence
from typing import Any

from sqlacache.policy import ConfigurationError

SIGNED = b"\xa7s"
ENCRYPTED = b"\xa7e"
_TAG = 32
_NONCE = 12
_MIN_SECRET = 16


def _secrets(value: Any, name: str, hint: str) -> list[bytes]:
    items = [value] if isinstance(value, (str, bytes)) else value
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or not items:
        raise ConfigurationError(
            f"{name}: give a str or bytes {hint}, or a non-empty list of them (rotation)"
        )
    out = []
    for item in items:
        if isinstance(item, str):
            item = item.encode()
        if not isinstance(item, bytes) or len(item) < _MIN_SECRET:
            raise ConfigurationError(
                f"{name}: {type(item).__name__} of {len(item) if isinstance(item, bytes) else '?'} bytes; "
                f"give at least {_MIN_SECRET} random bytes {hint}, e.g. secrets.token_hex(32)"
            )
        out.append(item)
    return out


def _derive(secrets: list[bytes], purpose: bytes) -> list[bytes]:
    """A key per secret for one purpose: the same secret never keys two different things."""
    return [hashlib.blake2b(s, digest_size=32, person=purpose).digest() for s in secrets]


class Seal:
    """Seals entries before they are stored and opens them after they are looked up."""

    def __init__(self, prefix: str, secret: Any = None, encryption_key: Any = None) -> None:
        self._context = f"{prefix}\x1f".encode()
        self._macs: list[bytes] = []
        self._ciphers: list[Any] = []
        # The keys that sign the near-cache's fan-out messages (backends/redis/signing.py): from the
        # secret, else from the encryption key — either way a cache with one has its fan-out signed.
        self.fanout_keys: list[bytes] = []
        if secret is not None:
            given = _secrets(secret, "secret", "(the same in every process)")
            self._macs = _derive(given, b"sqlacache.mac")
            self.fanout_keys = _derive(given, b"sqlacache.fan")
        if encryption_key is not None:
            try:
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            except ImportError:
                raise ConfigurationError(
                    "encryption_key needs the 'cryptography' package: pip install 'sqlacache[encryption]'"
                ) from None
            keys = _secrets(encryption_key, "encryption_key", "(the same in every process)")
            if not self.fanout_keys:
                self.fanout_keys = _derive(keys, b"sqlacache.fan")
            self._ciphers = [AESGCM(k) for k in _derive(keys, b"sqlacache.aes")]

    def _tag(self, mac_key: bytes, key: str, inner: bytes) -> bytes:
        # One C call over one buffer: HMAC-SHA256 runs on the CPU's SHA extensions where there are
        # (about 1 µs per KB), faster than keyed BLAKE2b beyond a few hundred bytes.
        return hmac.digest(mac_key, self._context + key.encode() + b"\x1f" + inner, "sha256")

    def close(self, key: str, inner: bytes) -> bytes:
        """``inner`` as it is stored under ``key``."""
        if self._ciphers:
            nonce = os.urandom(_NONCE)
            sealed: bytes = self._ciphers[0].encrypt(nonce, inner, self._context + key.encode())
            return ENCRYPTED + nonce + sealed
        return SIGNED + self._tag(self._macs[0], key, inner) + inner

    def open(self, key: str, stored: bytes) -> bytes | str:
        """The inner envelope of what was found under ``key``, or why it can't be trusted (a str)."""
        if self._ciphers:
            if stored[:2] != ENCRYPTED or len(stored) < 2 + _NONCE + 16:
                return "not encrypted with encryption_key"
            nonce, body = stored[2 : 2 + _NONCE], stored[2 + _NONCE :]
            aad = self._context + key.encode()
            for cipher in self._ciphers:
                try:
                    inner = cipher.decrypt(nonce, body, aad)
                except Exception:  # cryptography's InvalidTag: another key, or altered bytes
                    continue
                return bytes(inner)
            return "does not decrypt with any encryption_key (altered, or stored under another key)"
        if stored[:2] != SIGNED or len(stored) < 2 + _TAG:
            return "not signed"
        tag, inner = stored[2 : 2 + _TAG], stored[2 + _TAG :]
        for mac_key in self._macs:
            if hmac.compare_digest(tag, self._tag(mac_key, key, inner)):
                return inner
        return "bad signature (altered, stored under another key, or signed with another secret)"
