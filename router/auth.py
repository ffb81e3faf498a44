"""Optional API-key authentication for both front doors.

With a key configured, HTTP requests to /v1/* need `Authorization: Bearer <key>` and gRPC
calls to lmfleet.v1.Serving need metadata `authorization: Bearer <key>`; /health,
/metrics, gRPC health and reflection stay open (probes and scrapers have no key). The key
comes from `--api-key` or the environment variable LMFLEET_API_KEY. Keys are compared in
constant time so response timing does not reveal how much of a guess was right.
"""

from __future__ import annotations

import hmac
import os
from typing import Optional

API_KEY_ENV = "LMFLEET_API_KEY"


def api_key_from_env(explicit: Optional[str]) -> Optional[str]:
    """The explicit key if given (and non-empty), else $LMFLEET_API_KEY, else None."""
    key = explicit if explicit else os.environ.get(API_KEY_ENV)
    return key or None


def keys_match(expected: str, given: str) -> bool:
    """Constant-time comparison of two keys (as UTF-8 bytes)."""
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


class ApiKeyAuth:
    """Checks `Authorization` header values against the configured key (None: open)."""

    def __init__(self, api_key: Optional[str]) -> None:
        self.api_key = api_key

    @property
    def enabled(self) -> bool:
        return self.api_key is not None

    def authorized(self, authorization: Optional[str]) -> bool:
        """True if auth is off or `authorization` is `Bearer <the key>`."""
        if self.api_key is None:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return keys_match(self.api_key, token.strip())

    def authorized_metadata(self, metadata) -> bool:
        """The same check on gRPC invocation metadata (a sequence of key/value pairs)."""
        if self.api_key is None:
            return True
        for key, value in metadata or ():
            if key.lower() == "authorization":
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                return self.authorized(value)
        return False
