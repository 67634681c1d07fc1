"""SigV4 signing (``workers/providers/_sigv4.py``) against AWS's published test vectors.

The vectors are AWS's Signature Version 4 test suite (once at
docs.aws.amazon.com/general/latest/gr/signature-v4-test-suite.html), as AWS's
own SDKs vendor it:

- awslabs/aws-c-auth ``tests/aws-signing-test-suite/v4/<case>/header-signed-request.txt``:
  ``get-vanilla-query-order-key-case``, ``post-vanilla``, ``post-sts-header-before``;
- awslabs/aws-crt-python ``test/test_auth.py`` (``TestSigner``): ``get-vanilla`` and
  ``get-utf8`` (copied there from aws-c-auth), and a POST of ``hello`` with a
  signed ``x-amz-content-sha256``.

All use key ``AKIDEXAMPLE``, the secret below, 2015-08-30T12:36:00Z, region
us-east-1 and service ``service``.
"""

from __future__ import annotations

import calendar

import pytest

from workers.providers._sigv4 import AwsCredentials, canonical_uri, sign

KEY = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
STS_TOKEN = (
    "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmx"
    "fpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KP"
    "kyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqB"
    "Az+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA=="
)
WHEN_S = float(calendar.timegm((2015, 8, 30, 12, 36, 0)))
SCOPE = "AKIDEXAMPLE/20150830/us-east-1/service/aws4_request"
HOST = "https://example.amazonaws.com"


def _authorization(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    credentials: AwsCredentials = KEY,
    content_sha256: bool = False,
) -> dict[str, str]:
    return sign(
        method, url, headers or {}, body, region="us-east-1", service="service",
        credentials=credentials, clock=lambda: WHEN_S, sign_content_sha256=content_sha256,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("case", "method", "url", "signature"),
    [
        ("get-vanilla", "GET", f"{HOST}/",
         "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        ("get-vanilla-query-order-key-case", "GET", f"{HOST}/?Param2=value2&Param1=value1",
         "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
        ("get-utf8", "GET", f"{HOST}/\u1234",
         "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85"),
        ("post-vanilla", "POST", f"{HOST}/",
         "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
    ],
)  # fmt: skip
def test_the_published_vectors_without_a_body(
    case: str, method: str, url: str, signature: str
) -> None:
    added = _authorization(method, url)
    assert added == {
        "x-amz-date": "20150830T123600Z",
        "authorization": f"AWS4-HMAC-SHA256 Credential={SCOPE}, "
        f"SignedHeaders=host;x-amz-date, Signature={signature}",
    }, case


def test_post_sts_header_before_signs_the_session_token() -> None:
    added = _authorization("POST", f"{HOST}/", credentials=AwsCredentials(
        KEY.access_key_id, KEY.secret_access_key, STS_TOKEN))  # fmt: skip
    assert added["x-amz-security-token"] == STS_TOKEN
    assert added["authorization"] == (
        f"AWS4-HMAC-SHA256 Credential={SCOPE}, "
        "SignedHeaders=host;x-amz-date;x-amz-security-token, "
        "Signature=85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead"
    )


def test_a_body_is_signed_by_its_sha256_header_too() -> None:
    # aws-crt-python test_signing_sigv4_body: POST "hello", Content-Length 5.
    added = _authorization(
        "POST", f"{HOST}/", headers={"Content-Length": "5"}, body=b"hello", content_sha256=True
    )
    sha = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert added["x-amz-content-sha256"] == sha
    assert added["authorization"] == (
        f"AWS4-HMAC-SHA256 Credential={SCOPE}, "
        "SignedHeaders=content-length;host;x-amz-content-sha256;x-amz-date, "
        "Signature=8e17c5b22b7bb28da47f44b08691c087a0993d0965bfab053376360790d44d6c"
    )


def test_another_body_or_instant_is_another_signature() -> None:
    one = _authorization("POST", f"{HOST}/", body=b"hello", content_sha256=True)
    other = _authorization("POST", f"{HOST}/", body=b"hellp", content_sha256=True)
    assert one["authorization"] != other["authorization"]


def test_a_bedrock_model_id_is_encoded_once_more_in_the_canonical_uri() -> None:
    # On the wire the id's ":" is %3A; services other than S3 sign the path encoded again.
    path = "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse-stream"
    assert canonical_uri(path) == (
        "/model/anthropic.claude-3-5-haiku-20241022-v1%253A0/converse-stream"
    )


def test_the_host_header_leaves_the_default_port_out() -> None:
    with_port = _authorization("GET", "https://example.amazonaws.com:443/")
    assert with_port == _authorization("GET", f"{HOST}/")


def test_credentials_hide_their_secrets() -> None:
    shown = repr(AwsCredentials("AKIDEXAMPLE", "the-secret", "the-token"))
    assert "AKIDEXAMPLE" in shown
    assert "the-secret" not in shown and "the-token" not in shown
