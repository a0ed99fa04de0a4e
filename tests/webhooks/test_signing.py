"""Standard Webhooks secrets and signatures, checked against the
standardwebhooks package (an independent implementation)."""

from __future__ import annotations

import base64

import pytest
from standardwebhooks import Webhook as StandardWebhook

from control_plane.webhooks.signing import SecretInvalid, new_secret, secret_key, signed_headers

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def test_signature_verifies_with_the_reference_library() -> None:
    import time

    body = b'{"entity":"budget_policy","action":"exceeded"}'
    now = int(time.time())
    headers = signed_headers(SECRET, "msg_1", now, body)
    assert StandardWebhook(SECRET).verify(body, headers) == {
        "entity": "budget_policy",
        "action": "exceeded",
    }
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    # The library's own signature is the same string.
    from datetime import UTC, datetime

    expected = StandardWebhook(SECRET).sign(
        "msg_1", datetime.fromtimestamp(now, UTC), body.decode()
    )
    assert headers["webhook-signature"] == expected


def test_known_vector() -> None:
    # The example message of the Standard Webhooks spec, with our key.
    body = b'{"test": 2432232314}'
    headers = signed_headers(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    from datetime import UTC, datetime

    ref = StandardWebhook(SECRET).sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek", datetime.fromtimestamp(1614265330, UTC), body.decode()
    )
    assert headers["webhook-signature"] == ref


def test_no_secret_no_signature() -> None:
    assert signed_headers("", "msg_1", 5, b"{}") == {
        "webhook-id": "msg_1",
        "webhook-timestamp": "5",
    }


def test_new_secrets_are_valid_and_random() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("whsec_") and len(secret_key(a)) == 32


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        pytest.param("abc", 'must start with "whsec_"', id="no-prefix"),
        pytest.param("whsec_!!!!", "followed by standard base64", id="not-base64"),
        pytest.param(
            "whsec_" + base64.b64encode(b"short").decode(), "24 to 64 bytes, not 5", id="short"
        ),
        pytest.param(
            "whsec_" + base64.b64encode(bytes(65)).decode(), "24 to 64 bytes, not 65", id="long"
        ),
    ],
)
def test_bad_secrets_say_why_without_echoing_them(secret: str, message: str) -> None:
    with pytest.raises(SecretInvalid) as e:
        secret_key(secret)
    assert message in str(e.value)
    assert secret.removeprefix("whsec_") not in str(e.value) or secret == "abc"
