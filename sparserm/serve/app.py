"""The Ray Serve application: one deployment, ``RewardModelDeployment`` (the plain class ``RewardModelServer`` with
Serve's ingress), that loads the reward model once per replica, answers HTTP through FastAPI and
``DeploymentHandle`` calls through the same code path.

Routes: ``POST /v1/score``, ``POST /v1/compare``, ``POST /get_reward`` (OpenRLHF remote RM), ``GET /healthz``,
and FastAPI's ``/openapi.json`` and ``/docs``. Handle methods: ``score(items)``, ``compare(pairs)``,
``get_reward(query)``, ``info()``.

Batching: a request is split into items (one prompt with its response, or one compare pair), each tokenized
in the request path and queued to ``@serve.batch``; a batch closes at ``max_batch_size`` items, or at
``max_batch_tokens`` tokens (token-aware sizing via ``batch_size_fn``), or after ``batch_wait_timeout_s``.
Items of concurrent requests share batches; the model pass of a batch runs in a worker thread, so the event
loop keeps accepting and tokenizing requests meanwhile.

Errors: invalid JSON -> 400; schema errors -> 422; too many items / over-long texts -> 413 (or truncation);
an untokenizable/empty text -> 422; missing/wrong bearer token -> 401. Every error body is
``{"detail": message, "field": dotted path}``. Nothing a request sends can raise out of a replica.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from pathlib import Path

from ray import serve

from sparserm.serve.config import ServeConfig
from sparserm.serve.options import deployment_options, validate_serve
from sparserm.serve.schema import (CompareRequest, CompareResponse, HealthResponse, RewardRequest, RewardResponse,
                                   ScoreRequest, ScoreResponse, ServeRequestError, error_field, limit_items)
from sparserm.serve.scoring import batch_chunks, batch_size_fn

_INLINE_ENCODE_CHARS = 20_000

APP_NAME = "sparserm"
ENV = "env"  # build_app(token=ENV): read the token from the environment variable named by cfg.auth_env


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RewardModelServer:
    """The replica's logic (a plain class, usable without Serve); :data:`RewardModelDeployment` deploys it."""

    def __init__(self, rm_dir: str, cfg: ServeConfig, token_sha256: str | None = None):
        import torch

        from sparserm.reward.model import SparseRM
        from sparserm.serve.scoring import Scorer

        torch.set_num_threads(max(1, int(round(cfg.num_cpus or 1))))
        self.cfg, self.token_sha256 = cfg, token_sha256
        self.rm = SparseRM.load(rm_dir)
        self.model_name = str(self.rm.meta.get("name") or Path(rm_dir).resolve().name)
        self.scorer = Scorer(self.rm)
        self.scorer.score_groups([self.scorer.encode("warm-up", ["ok"])])  # load and fail here, not per request
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    # ------------------------------------------------------------ the batch

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=batch_size_fn)
    async def _batched(self, entries: list[tuple]) -> list[list[list[float]]]:
        groups = [g for chunk, _, _ in entries for g in chunk]
        try:
            scores = await asyncio.to_thread(self.scorer.score_groups, groups)
        except Exception:  # isolate the failing entry: the other requests of the batch still get their scores
            return [await self._score_alone(chunk) for chunk, _, _ in entries]
        out, i = [], 0
        for chunk, n, _ in entries:
            out.append(scores[i: i + n])
            i += n
        return out

    async def _score_alone(self, chunk) -> list[list[float]] | Exception:
        try:
            return await asyncio.to_thread(self.scorer.score_groups, chunk)
        except Exception as exc:
            return exc

    async def _score_groups(self, groups) -> list[list[float]]:
        c = self.cfg
        chunks = batch_chunks(groups, c.max_batch_size, c.max_batch_tokens)
        results = await asyncio.gather(*[self._batched(entry) for entry in chunks])
        for part in results:
            if isinstance(part, Exception):
                raise part
        return [s for part in results for s in part]

    async def _encode(self, fn, args: list[tuple], list_name: str) -> list:
        def run():
            out = []
            for i, a in enumerate(args):
                try:
                    out.append(fn(*a))
                except Exception as exc:  # a text the tokenizer cannot take is the caller's error
                    raise ServeRequestError(422, f"cannot encode item {i}: {exc}", f"{list_name}.{i}") from None
            return out

        # small requests are tokenized on the event loop (a thread hop costs more); large ones in a thread
        return run() if _chars(args) <= _INLINE_ENCODE_CHARS else await asyncio.to_thread(run)

    # ------------------------------------------------------------ the operations (HTTP and handle)

    async def _score(self, req: ScoreRequest) -> ScoreResponse:
        c = self.cfg
        rows, cut = limit_items(req.items, ("prompt", "response"), "items", c.max_items_per_request,
                                c.max_text_chars, c.overlong)
        groups = await self._encode(self.scorer.encode, [(r["prompt"], [r["response"]]) for r in rows], "items")
        scores = await self._score_groups(groups)
        return ScoreResponse(scores=[s[0] for s in scores], model=self.model_name, truncated=cut)

    async def _compare(self, req: CompareRequest) -> CompareResponse:
        c = self.cfg
        rows, cut = limit_items(req.pairs, ("prompt", "chosen", "rejected"), "pairs", c.max_items_per_request,
                                c.max_text_chars, c.overlong)
        groups = await self._encode(self.scorer.encode, [(r["prompt"], [r["chosen"], r["rejected"]]) for r in rows],
                                    "pairs")
        scores = await self._score_groups(groups)
        return CompareResponse(margins=[a - b for a, b in scores], chosen_scores=[a for a, _ in scores],
                               rejected_scores=[b for _, b in scores], model=self.model_name, truncated=cut)

    async def _reward(self, req: RewardRequest) -> RewardResponse:
        c = self.cfg
        rows, cut = limit_items(req.query, (), "query", c.max_items_per_request, c.max_text_chars, c.overlong)
        groups = await self._encode(self.scorer.encode_query, [(r["query"],) for r in rows], "query")
        rewards = [s[0] for s in await self._score_groups(groups)]
        return RewardResponse(rewards=rewards, scores=rewards, extra_logs={}, truncated=cut)

    # handle methods: plain dicts in and out; errors raise ServeRequestError (not retried by the client)

    async def score(self, items: list[dict]) -> dict:
        return (await self._score(_validate(ScoreRequest, {"items": items}))).model_dump()

    async def compare(self, pairs: list[dict]) -> dict:
        return (await self._compare(_validate(CompareRequest, {"pairs": pairs}))).model_dump()

    async def get_reward(self, query: list[str]) -> dict:
        return (await self._reward(_validate(RewardRequest, {"query": query}))).model_dump()

    def info(self) -> dict:
        c = self.cfg
        return {"model": self.model_name, "max_items_per_request": c.max_items_per_request,
                "max_text_chars": c.max_text_chars, "overlong": c.overlong, "auth": self.token_sha256 is not None}

    # ------------------------------------------------------------ HTTP

    def __serve_build_asgi_app__(self):
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse

        app = FastAPI(title="SparseRM reward model", version="1",
                      description="Scores from a SparseRM reward-model folder. Bearer auth on every route but "
                                  "/healthz when the server was started with a token.")
        server = self

        app.add_middleware(_Guard, token_sha256=self.token_sha256)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError):
            errors = [{"field": error_field(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                      for e in exc.errors()]
            if any(e["type"] == "json_invalid" for e in errors):
                return JSONResponse({"detail": "invalid JSON body", "field": "body", "errors": errors}, 400)
            # the deepest error names the field best (a union's last branch often goes deepest)
            first = max(errors, key=lambda e: len(e["field"].split(".")), default={"field": "body", "msg": "invalid"})
            return JSONResponse({"detail": f"{first['field']}: {first['msg']}", "field": first["field"],
                                 "errors": errors}, 422)

        @app.exception_handler(ServeRequestError)
        async def bad(request: Request, exc: ServeRequestError):
            return JSONResponse(exc.body(), exc.status)

        @app.get("/healthz", response_model=HealthResponse)
        async def healthz() -> HealthResponse:
            return HealthResponse(status="ok", model=server.model_name)

        @app.post("/v1/score", response_model=ScoreResponse)
        async def v1_score(req: ScoreRequest) -> ScoreResponse:
            return await server._score(req)

        @app.post("/v1/compare", response_model=CompareResponse)
        async def v1_compare(req: CompareRequest) -> CompareResponse:
            return await server._compare(req)

        @app.post("/get_reward", response_model=RewardResponse)
        async def get_reward(req: RewardRequest) -> RewardResponse:
            return await server._reward(req)

        return app


class _Guard:
    """ASGI middleware: with a token, a bearer token on every route but ``/healthz`` (401 before any parsing);
    a POST body is read as JSON whatever its content type says (``curl -d`` sends a form type)."""

    def __init__(self, app, token_sha256: str | None):
        self.app, self.token_sha256 = app, token_sha256

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            path, root = scope.get("path", ""), scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            if self.token_sha256 is not None and path.rstrip("/") != "/healthz":
                scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(_digest(given.strip()), self.token_sha256):
                    from fastapi.responses import JSONResponse

                    deny = JSONResponse({"detail": "missing or invalid bearer token", "field": "Authorization"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                    return await deny(scope, receive, send)
            if scope.get("method") == "POST" and b"json" not in headers.get(b"content-type", b""):
                kept = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": kept + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


RewardModelDeployment = serve.deployment(name="SparseRM")(serve.ingress()(RewardModelServer))


def _chars(x) -> int:
    if isinstance(x, str):
        return len(x)
    if isinstance(x, dict):
        return sum(_chars(v) for v in x.values())
    return sum(_chars(v) for v in x) if isinstance(x, (list, tuple)) else 0


def _validate(model, data: dict):
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        e = max(exc.errors(), key=lambda e: len(error_field(e.get("loc", ())).split(".")))
        raise ServeRequestError(422, e.get("msg", "invalid request"), error_field(e.get("loc", ()))) from None


def build_app(rm_dir: str | Path, cfg: ServeConfig | None = None, *, token: str | None = ENV):
    """The bound application for ``serve.run``. ``token``: the bearer token (``None``: no auth; default: the
    value of ``os.environ[cfg.auth_env]`` in this process, no auth when unset or empty). Only its SHA-256 is
    handed to the replicas."""
    cfg = validate_serve(cfg or ServeConfig())
    rm_dir = Path(rm_dir).resolve()
    if not (rm_dir / "rm.json").is_file():
        raise FileNotFoundError(f"{rm_dir} is not a SparseRM folder (no rm.json)")
    if token == ENV:
        token = os.environ.get(cfg.auth_env) if cfg.auth_env else None
    digest = _digest(token) if token else None
    return RewardModelDeployment.options(**deployment_options(cfg)).bind(str(rm_dir), cfg, digest)


def start(rm_dir: str | Path, cfg: ServeConfig | None = None, *, name: str = APP_NAME, route_prefix: str = "/",
          token: str | None = ENV, blocking: bool = False):
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` (a no-op when Serve already runs) and deploy the app.
    Returns the app's ``DeploymentHandle``."""
    cfg = validate_serve(cfg or ServeConfig())
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    return serve.run(build_app(rm_dir, cfg, token=token), name=name, route_prefix=route_prefix, blocking=blocking)
