"""Bearer-key check for the served routes (`serve.api_key_env` names the variable holding the key).

The key itself never travels in the application's arguments (Serve keeps those in its cluster
state and shows them in its config): where the app is built, the key is turned into a keyed
digest with a random salt, and replicas compare the digest of what a request presents against it
with `hmac.compare_digest` (constant time). Where the builder does not see the variable (a Serve
config file deployed on a cluster whose nodes hold the secret), the ingress reads it from its own
environment at start-up, and refuses to start without it rather than serve unauthenticated.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError


@dataclass(frozen=True)
class KeyCheck:
    env: str
    salt: bytes
    digest: bytes

    def ok(self, presented: Optional[str]) -> bool:
        if presented is None:
            return False
        return hmac.compare_digest(_digest(self.salt, presented), self.digest)


def _digest(salt: bytes, key: str) -> bytes:
    return hmac.new(salt, key.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def key_check(env: Optional[str], required: bool = False) -> Optional[KeyCheck]:
    """The check for `$env` as seen here; None when auth is off, or (not `required`) when the
    variable is not set here (the replica then reads it itself)."""
    if env is None:
        return None
    value = os.environ.get(env)
    if not value:
        if required:
            raise ConfigError(f"serve.api_key_env={env}: the variable {env} is not set (or empty); export it "
                              f"with the key clients must send as `Authorization: Bearer <key>`")
        return None
    salt = os.urandom(16)
    return KeyCheck(env, salt, _digest(salt, value))


def bearer(header: Optional[str]) -> Optional[str]:
    """The key of an `Authorization: Bearer <key>` header (None when absent or another scheme)."""
    if not header:
        return None
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()
