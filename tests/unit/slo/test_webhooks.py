"""Webhook signatures against the Standard Webhooks and GitHub test vectors."""

from __future__ import annotations

import pytest

from kdwatch.slo.webhooks import WebhookVerificationError, github_signature, headers, new_secret, sign, verify

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID, TS, BODY = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'


def test_the_standard_webhooks_test_vector() -> None:
    assert sign(SECRET, MSG_ID, TS, BODY) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_the_github_test_vector() -> None:
    assert github_signature("It's a Secret to Everybody", b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")


def test_verify_accepts_a_good_delivery_and_any_of_several_signatures() -> None:
    sent = headers(SECRET, MSG_ID, BODY, timestamp=TS)
    assert verify(SECRET, sent, BODY, now=TS + 10) == MSG_ID
    rotated = {**sent, "webhook-signature": f"{sign(new_secret(), MSG_ID, TS, BODY)} {sent['webhook-signature']}"}
    assert verify(SECRET, rotated, BODY, now=TS) == MSG_ID


@pytest.mark.parametrize("tamper", ["body", "stale", "future", "secret", "missing"])
def test_verify_rejects_a_tampered_or_stale_delivery(tamper: str) -> None:
    sent = headers(SECRET, MSG_ID, BODY, timestamp=TS)
    body, now, secret = BODY, TS, SECRET
    if tamper == "body":
        body = BODY.replace(b"2", b"3")
    elif tamper == "stale":
        now = TS + 301
    elif tamper == "future":
        now = TS - 301
    elif tamper == "secret":
        secret = new_secret()
    else:
        del sent["webhook-signature"]
    with pytest.raises(WebhookVerificationError):
        verify(secret, sent, body, now=now)
