"""The guard on an app of its own (the way a second service uses it): auth, body cap, error bodies, the 500 answer,
and the OpenAPI entries, through FastAPI's test client (no Ray)."""
from __future__ import annotations

import pytest
from pydantic import BaseModel

TOKEN = "guard-token"


class Echo(BaseModel):
    text: str


@pytest.fixture(scope="module")
def client():
    from starlette.testclient import TestClient

    from sparserm.serve.errors import ServeRequestError
    from sparserm.serve.guard import GuardSpec, digest, error_doc, guarded_app

    app = guarded_app(GuardSpec(digest(TOKEN), max_body_bytes=1000), title="other app")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    @app.get("/v1/models")
    async def models(owner: str | None = None) -> dict:
        return {"data": [], "owner": owner}

    @app.post("/v1/echo", responses={404: error_doc("no such text")})
    async def echo(req: Echo) -> Echo:
        if req.text == "missing":
            raise ServeRequestError(404, "no such text", "text")
        if req.text == "boom":
            raise RuntimeError("the model fell over")
        return req

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_auth_and_open_paths(client):
    assert client.get("/healthz").json() == {"ok": True}
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.json() == {"detail": "missing or invalid bearer token", "field": "Authorization",
                                                 "errors": []}
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models?owner=me", headers=AUTH).json() == {"data": [], "owner": "me"}
    assert client.post("/v1/echo", content="x" * 5000).status_code == 401  # auth before the size check


def test_error_bodies(client):
    r = client.post("/v1/echo", json={"text": "hi"}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"text": "hi"}
    r = client.post("/v1/echo", content="{oops", headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = client.post("/v1/echo", json={"text": 1}, headers=AUTH)
    assert r.status_code == 422 and r.json()["field"] == "text" and r.json()["errors"][0]["type"] == "string_type"
    r = client.post("/v1/echo", json={"text": "missing"}, headers=AUTH)
    assert r.status_code == 404 and r.json() == {"detail": "no such text", "field": "text", "errors": []}
    r = client.post("/v1/echo", json={"text": "boom"}, headers=AUTH)
    assert r.status_code == 500 and r.json() == {"detail": "internal server error (RuntimeError)", "field": None,
                                                 "errors": []}
    assert client.get("/v1/models", headers=AUTH).status_code == 200  # and the app keeps serving


def test_body_cap(client):
    r = client.post("/v1/echo", json={"text": "x" * 2000}, headers=AUTH)  # declared length over the cap
    assert r.status_code == 413 and r.json()["field"] == "body" and "max_body_bytes=1000" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"text": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    r = client.post("/v1/echo", content=chunks(), headers=AUTH)
    assert r.status_code == 413 and r.json()["field"] == "body"


def test_openapi_entries(client):
    spec = client.get("/openapi.json", headers=AUTH).json()
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    echo, models = spec["paths"]["/v1/echo"]["post"], spec["paths"]["/v1/models"]["get"]
    assert sorted(echo["responses"]) == ["200", "400", "401", "404", "413", "422", "500", "503"]
    assert sorted(models["responses"]) == ["200", "401", "422", "500", "503"]  # a query parameter: 422, no body
    assert sorted(spec["paths"]["/healthz"]["get"]["responses"]) == ["200", "500", "503"]
    assert all(echo["responses"][c]["content"] == ref for c in ("400", "401", "404", "413", "422", "500"))
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
