"""Signed fan-out messages: a one-time key per bump, the HMAC computed inside the bump script.

Why: anyone who can PUBLISH on ``<prefix>:fanout`` could otherwise send ``<born>.<n+1>`` with no
dependencies before the real ``n + 1``; the subscriber would apply it and skip the real one as
already seen, and the near-cache would keep serving what that commit changed (strict coherence
too: its position check would say "caught up").

How: the message is published by the bump script itself (atomic with the bump: the order of messages
is the order of bumps), and the dependencies it names are computed there (condition schemes), so the
client cannot sign them in advance — and the secret must never reach Redis (a reader of Redis,
MONITOR or SLOWLOG would see it). So per bump the committing client draws a fresh nonce ``r`` and
derives a one-time key ``k = HMAC-SHA256(K, "sqlacache-fanout\\0" prefix "\\0" r)`` (``K``: a key
derived from the secret for this purpose alone, seal.py's ``fanout_keys``); the script gets ``r``
and ``k`` in hex (in its count argument: see bump.lua), computes HMAC-SHA1 over
``<stamp>\\x1f<dep>…`` keyed with those 64 hex characters, and publishes
``<stamp>\\x1f<r>\\x1f<mac>\\x1f<dep>…`` (a subscriber without a secret reads ``r`` and the MAC as
two more dependencies, which no entry has: harmless). A subscriber with the secret derives ``k``
again from ``r`` with each accepted secret (rotation) and checks the MAC; a message that fails is
ignored — not applied, and no resync, so a forger can neither make it skip a real message nor empty
it at will — counted (``forged``) and logged. The real message then arrives and is applied. A real
message dropped for a bad MAC (a committer without the secret) shows up as a gap at the next one:
the subscriber resyncs (safe), and strict coherence's position check keeps the near-cache from
serving meanwhile.

Why it is sound: ``k`` is one-time and derived from a secret Redis never sees, and bound to the
prefix (a key for one prefix, or Cluster group, signs nothing for another). The real message is
published in the same script execution that receives ``k``, so it is in every subscriber's buffer
before anyone who could read ``k`` (MONITOR, SLOWLOG) could publish with it; and a subscriber refuses
a nonce it has seen in its last ``_RECENT`` messages, so ``k`` can't sign the next position either.
A message with a fresh ``r`` needs the secret. Left open: an admin who can MONITOR may keep an old
``r`` and ``k`` (one its subscribers no longer remember) and sign with them a position not reached
yet — the class of the already documented residual (a writer of Redis can roll versions back);
restricting MONITOR, SLOWLOG and CONFIG by ACL closes it (docs/security.rst). A replayed real
message is refused (a recent nonce) or ignored (a position already applied); one from before the
sequence started again makes the subscriber resync — the near-cache empties, nothing stale.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence

log = logging.getLogger("sqlacache.fanout")

_LABEL = b"sqlacache-fanout\x00"
_NONCE_HEX = 32  # 16 random bytes
_MAC_HEX = 40  # HMAC-SHA1
_RECENT = 4096  # nonces remembered per channel: a key seen in MONITOR can't sign the next position
_WARN_EVERY = 60.0  # s: at most one warning this often (a forger must not flood the logs)


def one_time_key(secret: bytes, prefix: str, nonce: str) -> bytes:
    """The key that signs one bump's message on ``prefix``'s channel."""
    return hmac.digest(secret, _LABEL + prefix.encode() + b"\x00" + nonce.encode(), "sha256")


def mac_of(secret: bytes, prefix: str, nonce: str, body: bytes) -> bytes:
    """The hex MAC bump.lua computes over ``body`` (``<stamp>\x1f<dep>…``) with the one-time key."""
    return hmac.digest(one_time_key(secret, prefix, nonce).hex().encode(), body, "sha1").hex().encode()


class FanoutKeys:
    """The secrets that sign and check fan-out messages (the first signs, any is accepted)."""

    def __init__(self, secrets: Sequence[bytes]) -> None:
        if not secrets:
            raise ValueError("FanoutKeys needs at least one secret")
        self.secrets = tuple(secrets)

    def count_arg(self, prefix: str, ndeps: int) -> str:
        """bump.lua's third argument: the number of dependencies, a fresh nonce and its one-time key."""
        nonce = os.urandom(_NONCE_HEX // 2).hex()
        return f"{ndeps}\x1f{nonce}\x1f{one_time_key(self.secrets[0], prefix, nonce).hex()}"


def signing_keys(current: FanoutKeys | None, secrets: Sequence[bytes]) -> FanoutKeys:
    """The keys a backend signs with once asked to sign with ``secrets`` (``current``: what it was
    asked before — a backend shared by several Caches must be asked the same)."""
    keys = FanoutKeys(secrets)
    if current is not None and current.secrets != keys.secrets:
        raise ValueError(
            "this backend's fan-out is signed with another secret already: "
            "give every Cache sharing a backend the same secret"
        )
    return keys


def count_arg(keys: FanoutKeys | None, prefix: str, ndeps: int) -> str:
    """bump.lua's third argument, signed with ``keys`` when there are (unsigned as before if not)."""
    return str(ndeps) if keys is None else keys.count_arg(prefix, ndeps)


class Verifier:
    """Checks the messages one subscriber hears; counts and logs what it refuses. One per
    subscriber thread (not thread-safe; ``forged`` is read from other threads). Without ``keys``
    (no secret: messages are not signed) it passes every message as it is."""

    def __init__(self, keys: FanoutKeys | None) -> None:
        self._secrets = keys.secrets if keys is not None else ()
        self._seen: dict[str, OrderedDict[bytes, None]] = {}  # per prefix: the last nonces
        self.forged = 0
        self._warned = -_WARN_EVERY

    def open(self, prefix: str, data: bytes) -> bytes | None:
        """``data`` in its unsigned form (``<stamp>\\x1f<dep>…``) if it is signed for ``prefix``
        with one of the secrets and its nonce is new; else None (counted, and logged now and then)."""
        if not self._secrets:
            return data
        stamp, _, rest = data.partition(b"\x1f")
        nonce, _, rest = rest.partition(b"\x1f")
        mac, sep, deps = rest.partition(b"\x1f")
        why = None
        if not sep or len(nonce) != _NONCE_HEX or len(mac) != _MAC_HEX:
            why = "not signed"
        else:
            body = stamp + b"\x1f" + deps
            text = nonce.decode("ascii", "replace")
            if not any(hmac.compare_digest(mac_of(s, prefix, text, body), mac) for s in self._secrets):
                why = "bad signature"
            else:
                seen = self._seen.setdefault(prefix, OrderedDict())
                if nonce in seen:
                    why = "nonce seen before"
                else:
                    seen[nonce] = None
                    if len(seen) > _RECENT:
                        seen.popitem(last=False)
                    return body
        self.forged += 1
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            log.warning(
                "sqlacache: ignored a fan-out message on %s:fanout (%s; %d so far): published by "
                "something without the secret, or a committer configured without it",
                prefix,
                why,
                self.forged,
            )
        return None
