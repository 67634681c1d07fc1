"""Azure OpenAI's paths: the deployment in the URL, the key and the ``api-version``.

Azure serves OpenAI's wire format (``_openai.py``, ``_embeddings.py``) under
``/openai/deployments/<deployment>/...``; ``azure_refusal`` is what it answers a
request that lacks its ``api-key`` header or its ``?api-version=``, as the real
service does (``_server.PATTERN_PATHS`` names both paths).
"""

from __future__ import annotations

from devstack.fake_provider._http import HttpRequest, json_response

__all__ = ["AZURE_NO_KEY", "AZURE_PREFIX", "azure_refusal"]

AZURE_PREFIX = b"/openai/deployments/"
AZURE_NO_KEY = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
    "provide a valid key for an active subscription and use a correct regional API "
    "endpoint for your resource."
)


def azure_refusal(request: HttpRequest) -> bytes | None:
    """What Azure answers a request without its key or ``api-version`` (None: neither)."""
    if not request.api_key:
        return json_response(401, {"error": {"code": "401", "message": AZURE_NO_KEY}})
    if b"api-version=" not in request.query:
        return json_response(404, {"error": {"code": "404", "message": "Resource not found"}})
    return None
