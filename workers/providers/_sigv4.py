"""AWS Signature Version 4 for one HTTP request: the headers that authenticate it.

Bedrock takes no API key: every request is signed with the caller's AWS
credentials, over the method, path, query, the headers sent and the exact body
bytes, for one region and service, at one instant (``x-amz-date``; AWS refuses
a signature more than 5 minutes off). The steps are AWS's:

1. the canonical request: method, canonical URI, canonical query, the signed
   headers (lowercased, sorted, values trimmed), their names, the body's SHA-256;
2. the string to sign: algorithm, timestamp, scope
   (``<date>/<region>/<service>/aws4_request``), the canonical request's SHA-256;
3. the signing key: HMAC-SHA256 chained over ``"AWS4" + secret``, date, region,
   service and ``aws4_request``; the signature is the HMAC of step 2 under it.

Pure stdlib (hashlib, hmac): the one function this needs does not justify
botocore's ~100 MB. Paths are encoded once more in the canonical URI, as every
service but S3 expects, so a Bedrock model id's ``:`` (``%3A`` on the wire)
is signed as ``%253A``. The session token of temporary credentials is a
signed header (``x-amz-security-token``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from urllib.parse import quote, unquote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclasses.dataclass(frozen=True, slots=True)
class AwsCredentials:
    """An access key pair, and the session token of temporary credentials (hidden in repr)."""

    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    session_token: str | None = dataclasses.field(default=None, repr=False)


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    region: str,
    service: str,
    credentials: AwsCredentials,
    clock: Callable[[], float] = time.time,
    sign_content_sha256: bool = True,
) -> dict[str, str]:
    """The headers to add to the request so that AWS accepts it.

    ``headers``: every header that will be sent besides these (all of them are
    signed; ``host`` is taken from ``url`` unless given). ``sign_content_sha256``:
    also send and sign ``x-amz-content-sha256`` (AWS's test suite signs without it).
    """
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(clock()))
    payload_hash = hashlib.sha256(body).hexdigest()
    added = {"x-amz-date": amz_date}
    if sign_content_sha256:
        added["x-amz-content-sha256"] = payload_hash
    if credentials.session_token:
        added["x-amz-security-token"] = credentials.session_token
    parts = urlsplit(url)
    signed = canonical_headers({"host": _host(parts.scheme, parts.netloc), **headers, **added})
    names = ";".join(signed)
    request = "\n".join(
        [
            method.upper(),
            canonical_uri(parts.path),
            canonical_query(parts.query),
            "".join(f"{name}:{value}\n" for name, value in signed.items()),
            names,
            payload_hash,
        ]
    )
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, amz_date, scope, _sha256(request.encode())])
    key = signing_key(credentials.secret_access_key, amz_date[:8], region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    added["authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={names}, Signature={signature}"
    )
    return added


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The day's key for one region and service, derived from the secret access key."""
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def canonical_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Names lowercased and sorted; values trimmed, inner runs of spaces collapsed.

    Two names that differ only in case are one header, their values joined by commas.
    """
    merged: dict[str, list[str]] = {}
    for name, value in headers.items():
        merged.setdefault(name.strip().lower(), []).append(" ".join(value.split()))
    return {name: ",".join(merged[name]) for name in sorted(merged)}


def canonical_uri(path: str) -> str:
    """The path as sent (already percent-encoded), encoded once more; ``/`` if empty."""
    return quote(path or "/", safe="/")


def canonical_query(query: str) -> str:
    """Parameters sorted by name then value, each strictly percent-encoded."""
    pairs = []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        pairs.append((_strict(unquote(name)), _strict(unquote(value))))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def _strict(text: str) -> str:
    return quote(text, safe="-_.~")


def _host(scheme: str, netloc: str) -> str:
    """The Host header httpx sends for this URL: the default port left out."""
    host = netloc.rpartition("@")[2].lower()
    name, sep, port = host.rpartition(":")
    if sep and "]" not in port and port.isdigit() and int(port) == _DEFAULT_PORTS.get(scheme):
        return name
    return host


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
