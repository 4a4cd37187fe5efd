"""The schemathesis run every service's OpenAPI test shares: generated requests for one operation of the running
service, each answer checked against the document (never a server error, a documented status and content type, a
body matching the documented schema)."""
from __future__ import annotations

from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 8  # per route, app and mode: a few seconds in all on the tiny models


def conforms(operation, mode, base_url: str, headers: dict | None = None, examples: int = EXAMPLES,
             prepare=None) -> None:
    """``examples`` generated cases of ``operation`` in ``mode`` sent to ``base_url``; ``prepare(case)`` may bound
    a case first (e.g. a generation budget, to keep the run short)."""

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode))
    def check(case):
        if prepare is not None:
            prepare(case)
        case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=60)

    check()
