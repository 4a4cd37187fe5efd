"""The steered chat service's OpenAPI document tells the truth: schemathesis calls each route of the running app
(valid requests, streamed or not, and invalid ones) and checks every answer against the document; and the document
lists each route's errors with the one ErrorBody schema, the stream's media type and the steering objects."""
from __future__ import annotations

import pytest
import requests
import schemathesis
from schemathesis import GenerationMode

from tests.serve.conformance import conforms

ROUTES = {("/healthz", "GET"), ("/v1/models", "GET"), ("/v1/chat/completions", "POST")}
CASES = [("/healthz", "GET", GenerationMode.POSITIVE), ("/v1/models", "GET", GenerationMode.POSITIVE),
         ("/v1/chat/completions", "POST", GenerationMode.POSITIVE),
         ("/v1/chat/completions", "POST", GenerationMode.NEGATIVE)]
BUDGET = 8  # generated requests ask for at most this many tokens and choices, so the run stays short on CPU


@pytest.fixture(scope="module")
def auth(steer_service):
    return {"Authorization": f"Bearer {steer_service['token']}"}


@pytest.fixture(scope="module")
def api(steer_service, auth):
    return schemathesis.openapi.from_url(steer_service["url"] + "/openapi.json", headers=auth)


def bounded(case) -> None:
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > BUDGET:
                body[key] = BUDGET
        if isinstance(body.get("n"), int) and body["n"] > 2:
            body["n"] = 2
        body.setdefault("max_tokens", BUDGET)


@pytest.mark.parametrize("path,method,mode", CASES, ids=[f"{m} {p} {mode}" for p, m, mode in CASES])
def test_every_route_conforms(steer_service, api, auth, path, method, mode):
    conforms(api[path][method], mode, steer_service["url"], auth, prepare=bounded)


def test_document_lists_every_error_and_the_stream(steer_service, auth):
    spec = requests.get(steer_service["url"] + "/openapi.json", headers=auth, timeout=30).json()
    ops = {(p, m.upper()): op for p, item in spec["paths"].items() for m, op in item.items()}
    assert set(ops) == ROUTES
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for (path, method), op in ops.items():
        errors = {code for code in op["responses"] if code >= "400"}
        expected = {"500", "503"} | ({"400", "413", "422"} if method == "POST" else set())
        if path != "/healthz":
            expected.add("401")
            assert op["security"] == [{"bearer": []}]
        assert errors == expected, (path, errors)
        assert all(op["responses"][code]["content"] == ref for code in expected - {"503"})
    chat = ops[("/v1/chat/completions", "POST")]["responses"]["200"]["content"]
    assert chat["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    data = chat["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]  # each event's data
    assert data[0] == {"type": "string", "const": "[DONE]"} and data[1]["contentMediaType"] == "application/json"
    assert data[1]["contentSchema"] == {"anyOf": [{"$ref": "#/components/schemas/ChatCompletionChunk"},
                                                  {"$ref": "#/components/schemas/StreamError"}]}
    schemas = spec["components"]["schemas"]
    assert set(schemas["SteeringRequest"]["properties"]) == {"enabled", "alpha", "mode", "k_prompt", "k_diff"}
    assert {"edited_tokens", "edited_latents", "latent_edits"} <= set(schemas["SteeringReport"]["required"])
    assert "steering" in schemas["ChatCompletion"]["required"] and "usage" in schemas["ChatCompletion"]["required"]
    assert "HTTPValidationError" not in schemas
