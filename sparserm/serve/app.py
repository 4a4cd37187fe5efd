"""The Ray Serve application: one deployment, ``RewardModelDeployment`` (the plain class ``RewardModelServer`` with
Serve's ingress), that loads the reward model once per replica, answers HTTP through FastAPI and
``DeploymentHandle`` calls through the same code path.

Routes: ``POST /v1/score``, ``POST /v1/compare``, ``POST /get_reward`` (OpenRLHF remote RM), ``POST /classify``
(vLLM's pooling route, as veRL's reward loop calls it), ``GET /healthz``, and FastAPI's ``/openapi.json`` and
``/docs``. Handle methods: ``score(items)``, ``compare(pairs)``, ``get_reward(query)``, ``info()``.

Batching: a request is split into items (one prompt with its response, or one compare pair), each tokenized
in the request path and queued to ``@serve.batch``; a batch closes at ``max_batch_size`` items, or at
``max_batch_tokens`` tokens (token-aware sizing via ``batch_size_fn``), or after ``batch_wait_timeout_s``.
Items of concurrent requests share batches; the model pass of a batch runs in a worker thread, so the event
loop keeps accepting and tokenizing requests meanwhile.

Binding, auth, the body cap, the error answers and their OpenAPI entries are :mod:`sparserm.serve.guard`'s;
the per-item limits :mod:`sparserm.serve.limits`'. Errors: invalid JSON -> 400; schema errors or an
untokenizable/empty text -> 422; too many items / over-long texts / a body over the cap -> 413 (or truncation);
missing/wrong bearer token -> 401. Every error body is :class:`~sparserm.serve.errors.ErrorBody`. Nothing a
request sends can raise out of a replica.
"""
from __future__ import annotations

import asyncio
import math
import time
import uuid
from pathlib import Path

from ray import serve

from sparserm.serve.config import ServeConfig
from sparserm.serve.errors import ServeRequestError, validation_error
from sparserm.serve.guard import ENV, GuardSpec, add_health, bind, guarded_app, token_digest
from sparserm.serve.limits import limit_items
from sparserm.serve.options import deployment_options, validate_serve
from sparserm.serve.schema import (ClassifyData, ClassifyRequest, ClassifyResponse, ClassifyUsage, CompareRequest,
                                   CompareResponse, RewardRequest, RewardResponse, ScoreRequest, ScoreResponse)
from sparserm.serve.scoring import batch_chunks, batch_size_fn

_INLINE_ENCODE_CHARS = 20_000

APP_NAME = "sparserm"


class RewardModelServer:
    """The replica's logic (a plain class, usable without Serve); :data:`RewardModelDeployment` deploys it."""

    def __init__(self, rm_dir: str, cfg: ServeConfig, token_sha256: str | None = None):
        import torch

        from sparserm.reward.model import SparseRM
        from sparserm.serve.scoring import Scorer

        torch.set_num_threads(max(1, int(round(cfg.num_cpus or 1))))
        self.cfg, self.guard = cfg, GuardSpec.from_config(cfg, token_sha256)
        self.rm = SparseRM.load(rm_dir)
        self.model_name = str(self.rm.meta.get("name") or rm_dir.split("?")[0].rstrip("/").rsplit("/", 1)[-1])
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

    async def _encode(self, fn, args: list[tuple], list_name: str, single: bool = False) -> list:
        def run():
            out = []
            for i, a in enumerate(args):
                try:
                    out.append(fn(*a))
                except Exception as exc:  # a text the tokenizer cannot take is the caller's error
                    field = list_name if single else f"{list_name}.{i}"
                    raise ServeRequestError(422, f"cannot encode item {i}: {exc}", field) from None
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
        rows, cut = limit_items([self.scorer.strip_query(q) for q in req.query], (), "query", c.max_items_per_request,
                                c.max_text_chars, c.overlong)
        groups = await self._encode(self.scorer.encode_query, [(r["query"],) for r in rows], "query")
        rewards = [s[0] for s in await self._score_groups(groups)]
        return RewardResponse(rewards=rewards, scores=rewards, extra_logs={}, truncated=cut)

    async def _classify(self, req: ClassifyRequest) -> ClassifyResponse:
        """``/get_reward``'s scoring of full texts, in vLLM's classification shape (one class: the reward)."""
        c, single = self.cfg, isinstance(req.input, str)
        texts = [self.scorer.strip_query(q) for q in ([req.input] if single else req.input)]  # its padding off
        rows, cut = limit_items(texts, (), "input", c.max_items_per_request, c.max_text_chars, c.overlong,
                                single=single)
        groups = await self._encode(self.scorer.encode_query, [(r["query"], req.add_special_tokens) for r in rows],
                                    "input", single)
        scores = [s[0] for s in await self._score_groups(groups)]
        use = req.use_activation if req.use_activation is not None else req.activation
        probs = scores if use is False else [0.5 * (1.0 + math.tanh(s / 2)) for s in scores]  # sigmoid, no overflow
        tokens = sum(g.n_tokens_total for g in groups)
        return ClassifyResponse(id=f"classify-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_name,
                                data=[ClassifyData(index=i, probs=[p]) for i, p in enumerate(probs)],
                                usage=ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens), truncated=cut)

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
                "max_text_chars": c.max_text_chars, "overlong": c.overlong, "auth": self.guard.token_sha256 is not None}

    # ------------------------------------------------------------ HTTP

    def __serve_build_asgi_app__(self):
        app = guarded_app(self.guard, title="SparseRM reward model", version="1",
                          description="Scores from a SparseRM reward-model folder. Bearer auth on every route but "
                                      "/healthz when the server was started with a token. Every error body is "
                                      "ErrorBody.")
        server = self
        add_health(app, server.model_name)
        for path, body, answer, op in POST_ROUTES:
            app.add_api_route(path, _endpoint(getattr(server, op), body), methods=["POST"], response_model=answer,
                              name=op.lstrip("_"))
        return app


# path, request body, answer, the server's operation
POST_ROUTES = (("/v1/score", ScoreRequest, ScoreResponse, "_score"),
               ("/v1/compare", CompareRequest, CompareResponse, "_compare"),
               ("/get_reward", RewardRequest, RewardResponse, "_reward"),
               ("/classify", ClassifyRequest, ClassifyResponse, "_classify"))


def _endpoint(op, body):
    """A FastAPI endpoint that validates the JSON body as ``body`` and answers ``await op(request)``."""
    async def endpoint(req):
        return await op(req)

    endpoint.__annotations__ = {"req": body}
    return endpoint


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
        raise validation_error(exc.errors()) from None


def build_app(rm_dir: str | Path, cfg: ServeConfig | None = None, *, token: str | None = ENV):
    """The bound application for ``serve.run``. ``token``: the bearer token (``None``: no auth; default: the
    value of ``os.environ[cfg.auth_env]`` in this process, no auth when unset or empty). Only its SHA-256 is
    handed to the replicas."""
    from sparserm.storage import fetched, portable

    cfg = validate_serve(cfg or ServeConfig())
    rm_dir = portable(rm_dir)  # a URI: each replica pulls it
    if not (fetched(rm_dir) / "rm.json").is_file():
        raise FileNotFoundError(f"{rm_dir} is not a SparseRM folder (no rm.json)")
    digest = token_digest(token, cfg.auth_env)
    return RewardModelDeployment.options(**deployment_options(cfg)).bind(rm_dir, cfg, digest)


def start(rm_dir: str | Path, cfg: ServeConfig | None = None, *, name: str = APP_NAME, route_prefix: str = "/",
          token: str | None = ENV, blocking: bool = False):
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` (a no-op when Serve already runs) and deploy the app.
    Returns the app's ``DeploymentHandle``."""
    cfg = validate_serve(cfg or ServeConfig())
    bind(cfg.host, cfg.port)
    return serve.run(build_app(rm_dir, cfg, token=token), name=name, route_prefix=route_prefix, blocking=blocking)
