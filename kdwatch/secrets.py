"""Webhook signing secrets: the ``whsec_`` format (Standard Webhooks), parsed in one place.

Settings validate secrets with it at start-up; ``kdwatch.slo.webhooks`` signs and verifies with it.
"""

from __future__ import annotations

import base64
import secrets

SECRET_PREFIX = "whsec_"


def new_webhook_secret() -> str:
    """A fresh secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def webhook_secret_key(secret: str) -> bytes:
    """The HMAC key inside a ``whsec_`` secret; ValueError unless it is ``whsec_`` + base64 of 24 to 64 bytes."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("webhook secrets start with whsec_")
    key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    if not 24 <= len(key) <= 64:
        raise ValueError("webhook secrets hold 24 to 64 bytes")
    return key
