"""The OpenAPI document tells the truth: schemathesis calls every route of the running service (both apps) and checks
that each answer's status is documented and its body matches the documented schema; then each error the service
can be made to answer is checked against the document, and the document's error entries against ErrorBody."""
from __future__ import annotations

import pytest
import requests
import schemathesis
from schemathesis import GenerationMode

from tests.serve.conformance import conforms
from tests.serve.conftest import LIMITS

ROUTES = {("/healthz", "GET"), ("/v1/score", "POST"), ("/v1/compare", "POST"), ("/get_reward", "POST"),
          ("/classify", "POST")}
# valid requests for every route, invalid ones for every route that takes input (GET /healthz takes none)
CASES = [(p, m, mode) for p, m in sorted(ROUTES) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if m == "POST" or mode == GenerationMode.POSITIVE]


@pytest.fixture(scope="module")
def rm_api(service):
    return schemathesis.openapi.from_url(service["url"] + "/openapi.json")


@pytest.fixture(scope="module")
def rm_api_auth(service):
    return schemathesis.openapi.from_url(service["auth_url"] + "/openapi.json",
                                         headers={"Authorization": f"Bearer {service['token']}"})


@pytest.mark.parametrize("app", ["rm_api", "rm_api_auth"])
@pytest.mark.parametrize("path,method,mode", CASES, ids=[f"{m} {p} {mode}" for p, m, mode in CASES])
def test_every_route_conforms(request, service, path, method, mode, app):
    """Generated requests (bodies valid by the document, and invalid ones) to the running service: the answer is
    never a server error, its status is documented for the route, and its body matches the documented schema."""
    base = service["url"] if app == "rm_api" else service["auth_url"]
    headers = {"Authorization": f"Bearer {service['token']}"} if app == "rm_api_auth" else None
    conforms(request.getfixturevalue(app)[path][method], mode, base, headers)


def _spec(url: str, token: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(url + "/openapi.json", headers=headers, timeout=30).json()


def test_document_lists_every_error_with_one_schema(service):
    for url, token in ((service["url"], None), (service["auth_url"], service["token"])):
        spec = _spec(url, token)
        ops = {(p, m.upper()): op for p, item in spec["paths"].items() for m, op in item.items()}
        assert set(ops) == ROUTES
        schemas = spec["components"]["schemas"]
        assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas  # FastAPI's, never sent
        assert schemas["ErrorBody"]["required"] == ["detail"]
        assert set(schemas["ErrorBody"]["properties"]) == {"detail", "field", "errors"}
        for (path, method), op in ops.items():
            errors = {code for code in op["responses"] if code >= "400"}
            expected = {"500", "503"}
            if method == "POST":
                expected |= {"400", "413", "422"}
            if token and path != "/healthz":
                expected.add("401")
                assert op["security"] == [{"bearer": []}]
            assert errors == expected, (path, errors)
            for code in expected - {"503"}:  # 503 is Serve's proxy's plain-text answer, not the app's
                assert op["responses"][code]["content"] == {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
            assert op["responses"]["503"]["content"] == {"text/plain": {"schema": {"type": "string"}}}
        assert ("securitySchemes" in spec["components"]) == bool(token)


def _post(url, path, data=None, body=None, token=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    return requests.post(url + path, json=body, data=data, headers=headers, timeout=60)


def test_real_error_bodies_match_the_document(service, rm_api, rm_api_auth):
    """Each error the service answers, provoked on purpose, is documented for its operation and matches ErrorBody
    there (schemathesis's own response validation against the loaded document)."""
    url, n = service["url"], LIMITS["max_items_per_request"]
    long = "x" * (LIMITS["max_text_chars"] + 1)
    cases = [
        (rm_api, url, "/v1/score", dict(data="{not json"), 400, "body"),
        (rm_api, url, "/v1/score", dict(body={"items": [{"prompt": "p"}]}), 422, "items.0.response"),
        (rm_api, url, "/v1/score", dict(body={"items": [{"prompt": "p", "response": "r"}] * (n + 1)}), 413, "items"),
        (rm_api, url, "/v1/compare", dict(body={"pairs": [{"prompt": long, "chosen": "a", "rejected": "b"}]}), 413,
         "pairs.0.prompt"),
        (rm_api, url, "/get_reward", dict(body={"query": "not a list"}), 422, "query"),
        (rm_api, url, "/classify", dict(body={"input": long}), 413, "input"),
        (rm_api, url, "/classify", dict(body={"input": ["ok", long]}), 413, "input.1"),
        (rm_api, url, "/classify", dict(data="x" * (1 << 20 | 1)), 413, "body"),  # over the 1 MiB body cap
        (rm_api_auth, service["auth_url"], "/v1/score", dict(body={"items": []}), 401, "Authorization"),
        (rm_api_auth, service["auth_url"], "/classify", dict(body={"bad": 1}), 401, "Authorization"),
    ]
    for api, base, path, kwargs, status, field in cases:
        r = _post(base, path, **kwargs)
        assert r.status_code == status, (path, r.text)
        body = r.json()
        assert body["field"] == field and isinstance(body["detail"], str) and isinstance(body["errors"], list)
        op = api[path]["POST"]
        assert str(status) in op.definition.raw["responses"], (path, status)
        op.validate_response(r)  # raises when the body does not match the documented schema
    r = _post(url, "/v1/score", body={"items": [{"prompt": 3, "response": "x"}]})
    assert r.json()["errors"] and all(set(e) == {"field", "msg", "type"} for e in r.json()["errors"])
    assert _post(service["auth_url"], "/v1/score", body={"items": []}).headers["WWW-Authenticate"] == "Bearer"


def test_router_errors_use_the_same_body(service):
    """404 and 405 come from the router, outside any operation; their bodies are ErrorBody too."""
    from sparserm.serve.errors import ErrorBody

    for r, status in ((requests.get(service["url"] + "/nope", timeout=30), 404),
                      (requests.get(service["url"] + "/v1/score", timeout=30), 405)):
        assert r.status_code == status and r.headers["content-type"] == "application/json"
        assert ErrorBody.model_validate(r.json()).field is None
