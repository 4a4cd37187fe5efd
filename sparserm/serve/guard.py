"""The HTTP guard every sparserm app shares: binding, bearer-token auth, the body-size cap, error answers and an
OpenAPI document that lists them.

An app is ``guarded_app(spec, title=...)`` plus its routes; Serve's proxy is bound with :func:`bind`. Then:

* **Binding**: Serve's one HTTP proxy on ``host:port`` (127.0.0.1 unless the config says otherwise).
* **Auth**: with a token, every route but ``spec.open_paths`` needs ``Authorization: Bearer <token>``; anything
  else is a 401 before the body is read. Only the token's SHA-256 reaches the replicas.
* **Size**: a body over ``spec.max_body_bytes`` is a 413; the per-item and per-text limits are
  :mod:`sparserm.serve.limits`.
* **Errors**: every error is an :class:`~sparserm.serve.errors.ErrorBody` in JSON: invalid JSON 400, missing or
  wrong token 401, unknown path 404, wrong method 405, too large 413, schema errors 422, and 500 for anything a
  route raises (logged; the replica keeps serving). A POST body is read as JSON whatever its content type says
  (``curl -d`` sends a form type).
* **OpenAPI**: every operation lists the errors above that it can answer, all with the ErrorBody schema (FastAPI's
  own 422 schema, which no body matched, is gone), the bearer scheme when auth is on, and 503, which Serve's proxy
  (not the app) answers in text/plain when no replica can take the request. A route declares any further error of
  its own with ``responses={404: error_doc("...")}``; models that only such a hand-written entry references are
  added to the document's components with ``guarded_app(..., schemas=(Model, ...))``.
"""
from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass

from sparserm.serve.errors import ErrorBody, ServeRequestError, validation_error

ENV = "env"  # token=ENV: read the token from the environment variable named by the config's auth_env
OPEN_PATHS = ("/healthz",)
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_REF = {"$ref": "#/components/schemas/ErrorBody"}
_DOCS = {400: "the body is not valid JSON",
         401: "missing or wrong bearer token",
         413: "over a size limit: too many items, a text over max_text_chars (overlong: reject), or a body over "
              "the byte cap",
         422: "the request does not match the schema, or a value cannot be used (a text that cannot be tokenized)",
         500: "the server failed; the request may be retried"}
_PROXY_503 = {"description": "Ray Serve's proxy (not the app): no replica can take the request now; retry",
              "content": {"text/plain": {"schema": {"type": "string"}}}}

logger = logging.getLogger("sparserm.serve")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_digest(token: str | None, auth_env: str | None) -> str | None:
    """SHA-256 of the bearer token: ``token`` itself, or with ``token=ENV`` the value of ``os.environ[auth_env]``
    in this process; ``None`` (no auth) when there is none or it is empty."""
    if token == ENV:
        token = os.environ.get(auth_env) if auth_env else None
    return digest(token) if token else None


@dataclass(frozen=True)
class GuardSpec:
    token_sha256: str | None = None  # None: no auth
    max_body_bytes: int | None = None  # None: no cap
    open_paths: tuple[str, ...] = OPEN_PATHS

    @classmethod
    def from_config(cls, cfg, token_sha256: str | None = None) -> "GuardSpec":
        """From a ``serve:`` section: the body cap is 32 bytes per character of ``max_items_per_request`` texts of
        ``max_text_chars`` (room for escapes and several texts an item), at least 1 MiB."""
        return cls(token_sha256, max(1 << 20, 32 * cfg.max_items_per_request * cfg.max_text_chars))


def bind(host: str, port: int) -> None:
    """Start Serve's HTTP proxy on ``host:port`` (a no-op when Serve already runs)."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})


def error_doc(description: str) -> dict:
    """A route's own further error for ``responses=``, with the ErrorBody schema."""
    return {"model": ErrorBody, "description": description}


def guarded_app(spec: GuardSpec, *, schemas: tuple = (), **fastapi_kwargs):
    """A FastAPI app with the guard, the error handlers and the error-listing OpenAPI document (with the pydantic
    models ``schemas`` in its components too)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    app = FastAPI(**fastapi_kwargs)
    app.add_middleware(_Guard, spec=spec)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        err = validation_error(exc.errors())
        return error_response(err.status, err.body())

    @app.exception_handler(ServeRequestError)
    async def rejected(request: Request, exc: ServeRequestError):
        return error_response(exc.status, exc.body())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # 404, 405, and the body cap's 413
        field = "body" if exc.status_code == 413 else None
        return error_response(exc.status_code, ErrorBody(detail=str(exc.detail), field=field).model_dump(),
                              exc.headers)

    build = app.openapi

    def openapi() -> dict:
        if getattr(app, "_documented", None) is None:
            app._documented = add_schemas(document_errors(copy.deepcopy(build()), spec), schemas)
        return app._documented

    app.openapi = openapi
    return app


def add_health(app, model: str) -> None:
    """``GET /healthz`` on ``app``: ``{"status": "ok", "model": model}`` (open with auth on, ``OPEN_PATHS``)."""
    from sparserm.serve.schema import HealthResponse

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        return HealthResponse(status="ok", model=model)


def error_response(status: int, body: dict, headers: dict | None = None):
    """An ErrorBody answer; ASCII JSON, so a lone surrogate echoed from a request cannot fail the encoding."""
    from starlette.responses import Response

    return Response(json.dumps(body, ensure_ascii=True, separators=(",", ":")), status, headers,
                    media_type="application/json")


class _Guard:
    """ASGI middleware: auth (before anything is read), JSON content type for POST bodies, and a 500 ErrorBody
    for any exception a route lets out before its answer started."""

    def __init__(self, app, spec: GuardSpec):
        self.app, self.spec = app, spec
        self.open = {p.rstrip("/") for p in spec.open_paths}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.spec.token_sha256 is not None and _route_path(scope).rstrip("/") not in self.open:
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest(given.strip()), self.spec.token_sha256):
                body = ErrorBody(detail="missing or invalid bearer token", field="Authorization").model_dump()
                return await error_response(401, body, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if self.spec.max_body_bytes is not None:
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.spec.max_body_bytes:
                return await error_response(413, self._too_large())(scope, receive, send)
            receive = self._capped(receive)
        if scope.get("method") == "POST" and b"json" not in headers.get(b"content-type", b""):
            kept = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": kept + [(b"content-type", b"application/json")]}
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            logger.exception("request to %s failed", scope.get("path"))
            if started:
                raise
            body = ErrorBody(detail=f"internal server error ({type(exc).__name__})").model_dump()
            await error_response(500, body)(scope, receive, send)


    def _too_large(self) -> dict:
        return ErrorBody(detail=f"the request body is larger than max_body_bytes={self.spec.max_body_bytes}",
                         field="body").model_dump()

    def _capped(self, receive):
        """``receive`` that counts the body (sent without a length, or longer than it said): over the cap it raises
        the 413 that the route's body read passes on to the error handler."""
        from starlette.exceptions import HTTPException

        seen = 0

        async def capped():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.spec.max_body_bytes:
                raise HTTPException(413, self._too_large()["detail"])
            return message

        return capped


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def document_errors(doc: dict, spec: GuardSpec) -> dict:
    """FastAPI's OpenAPI document with every operation's error answers (see the module docstring)."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    add_schemas(doc, (ErrorBody,))
    auth = spec.token_sha256 is not None
    opened = {p.rstrip("/") for p in spec.open_paths}
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if method not in _METHODS:
                continue
            responses = op.setdefault("responses", {})
            codes = [400, 413] if "requestBody" in op else []
            if "requestBody" in op or op.get("parameters"):
                codes.append(422)
            if auth and path.rstrip("/") not in opened:
                codes.append(401)
                op["security"] = [{"bearer": []}]
            for code in [*codes, 500]:
                responses[str(code)] = {"description": _DOCS[code], "content": {"application/json": {"schema": _REF}}}
            responses["503"] = _PROXY_503
    if auth:
        doc["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    return doc


def add_schemas(doc: dict, models) -> dict:
    """The pydantic ``models`` (and the models they use) in the document's components, by class name."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return doc
