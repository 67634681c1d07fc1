"""The JSON Schema of the wire protocol, for clients in other languages (`llmrelay schema`)."""

from __future__ import annotations

from typing import Any

import msgspec

from broker._errors import ERROR_CODES
from broker._protocol import Event, Job


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a job and of the reply events, with every error code."""
    (job_schema, event_schema), components = msgspec.json.schema_components(
        [Job, Event], ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "llmrelay wire protocol",
        "description": (
            "Publish a Job (JSON) to llm.jobs.<route>; read Events (JSON) on the "
            "job's reply_to subject. Unknown fields are ignored by readers."
        ),
        "$defs": components,
        "properties": {"job": job_schema, "event": event_schema},
        "error_codes": {
            code: {"description": desc, "retryable": retryable, "http_status": status}
            for code, (desc, retryable, status) in ERROR_CODES.items()
        },
    }
