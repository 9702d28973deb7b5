"""Standard Webhooks signatures: sign on send, verify on receipt.

``webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>``; several
space-separated signatures allow key rotation. Secrets are ``whsec_`` + base64 of 24-64 bytes.
Receivers compare in constant time and reject timestamps more than 5 minutes off.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

from kdwatch.errors import KdwatchError
from kdwatch.secrets import SECRET_PREFIX, new_webhook_secret, webhook_secret_key

__all__ = ["SECRET_PREFIX", "TOLERANCE_S", "WebhookVerificationError", "headers", "new_secret", "sign", "verify"]

TOLERANCE_S = 300


class WebhookVerificationError(KdwatchError):
    """A delivery's signature or timestamp does not verify."""


new_secret = new_webhook_secret


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    mac = hmac.new(webhook_secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(secret, msg_id, ts, body),
            "content-type": "application/json"}


def verify(secret: str, received: Mapping[str, str], body: bytes, now: float | None = None,
           tolerance_s: int = TOLERANCE_S) -> str:
    """Check a delivery; returns its ``webhook-id`` (the idempotency key) or raises."""
    lower = {k.lower(): v for k, v in received.items()}
    try:
        msg_id, ts_text, signatures = lower["webhook-id"], lower["webhook-timestamp"], lower["webhook-signature"]
    except KeyError as missing:
        raise WebhookVerificationError(f"missing header {missing.args[0]}") from None
    try:
        ts = int(ts_text)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is outside the tolerance")
    expected = sign(secret, msg_id, ts, body)
    for candidate in signatures.split():
        if hmac.compare_digest(candidate.encode(), expected.encode()):
            return msg_id
    raise WebhookVerificationError("no matching signature")


def github_signature(secret: str, body: bytes) -> str:
    """GitHub's ``X-Hub-Signature-256`` value (sha256=<hex HMAC of the body>), for receivers that use it."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
