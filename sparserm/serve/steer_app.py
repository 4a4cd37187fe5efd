"""The steered chat service: a Ray Serve app over a steering-map folder with OpenAI's chat-completions API.

One deployment, ``SteerDeployment`` (the plain class :class:`SteerServer` with Serve's ingress), loads the map's
model and both SAEs once per replica (``SteeredGenerator``). Routes: ``POST /v1/chat/completions`` (an answer, or
with ``"stream": true`` server-sent events in OpenAI's chunk format ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /healthz``, and FastAPI's ``/openapi.json`` and ``/docs``. Schema: :mod:`.chat_schema`.

Batching: each request is validated, its messages rendered and its steering settings resolved in the request path,
then queued to ``@serve.batch`` as one job of ``n`` rows; a batch closes at ``serve.max_batch_size`` rows or after
``serve.batch_wait_timeout_s`` and runs as :mod:`.chat_batch` groups it, in a worker thread. Every row carries its
own steering vector (computed from its own prompt), so a request gets inside a batch what it gets alone. A stream
does not need a generation of its own: the generator's per-token callback hands each row's text to its request as
it is produced, so streamed and plain requests share batches; a stream ends (usage and steering counts come from
the finished call) when its batch's call does.

Binding, auth, the body cap, the error answers and their OpenAPI entries are :mod:`.guard`'s, the size limits
:mod:`.limits`' (``serve.max_items_per_request`` messages and choices, ``serve.max_text_chars`` per message), as in
the reward-model app. A prompt is never cut: it and its ``max_tokens`` must fit the model's context. Errors: invalid
JSON 400; schema errors (e.g. ``steering.mode``), messages the chat template cannot render, or ``max_tokens`` past
what the context leaves after the prompt 422 naming the field; too many messages or choices, a long message, a prompt
as long as the context, a body over the cap 413; a missing or wrong token 401.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

from ray import serve

from sparserm.serve.chat_answer import DONE, Chunks, completion, event
from sparserm.serve.chat_batch import ChatJob, job_rows, plan, run_call
from sparserm.serve.chat_schema import (STREAM_RESPONSE, STREAM_SCHEMAS, ChatCompletion, ChatCompletionRequest,
                                        ModelCard, ModelList, StreamError)
from sparserm.serve.config import ServeConfig
from sparserm.serve.detok import TextTracker
from sparserm.serve.errors import ErrorBody, ServeRequestError
from sparserm.serve.guard import ENV, GuardSpec, add_health, bind, guarded_app, token_digest
from sparserm.serve.limits import check_count, cut_messages
from sparserm.serve.options import deployment_options, validate_serve

APP_NAME = "sparserm-steer"
logger = logging.getLogger("sparserm.serve")
GREEDY_BELOW = 1e-5  # a temperature under it decodes greedily (vLLM's rule)
ROUTES = ("/v1/chat/completions", "/v1/models", "/healthz", "/docs")


class SteerServer:
    """The replica's logic (a plain class, usable without Serve); :data:`SteerDeployment` deploys it."""

    def __init__(self, map_dir: str, cfg: ServeConfig, token_sha256: str | None = None):
        import torch

        from sparserm.steering.generate import SteeredGenerator
        from sparserm.storage import base_name

        torch.set_num_threads(max(1, int(round(cfg.num_cpus or 1))))
        self.cfg, self.guard = cfg, GuardSpec.from_config(cfg, token_sha256)
        self.gen = SteeredGenerator.load(map_dir)
        self.model_name, self.root = base_name(map_dir), str(self.gen.map.cfg.model.name)
        model_cfg = self.gen.map.cfg.model
        self.context = getattr(self.gen.model.config, "max_position_embeddings", None) or model_cfg.max_tokens
        # a prompt is never cut here (it must fit the context with its max_tokens), so the generator renders it whole
        self.created, self.defaults = int(time.time()), self.gen.sampling(max_prompt_tokens=self.context)
        self._one_call = threading.Lock()  # the hook sits on the one model: one generate call at a time
        self.gen.generate([[{"role": "user", "content": "warm-up"}]], None,  # load and fail here, not per request
                          replace(self.defaults, max_new_tokens=1, temperature=0.0))
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    # ------------------------------------------------------------ the batch

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=job_rows)
    async def _batched(self, jobs: list[ChatJob]) -> list:
        results: list = [None] * len(jobs)
        for idx, sampling, seed in plan(jobs):
            part = [jobs[i] for i in idx]
            try:
                outs = await asyncio.to_thread(self._call, part, sampling, seed)
            except Exception as exc:  # no retry: streamed text may have gone out; the next call still runs
                outs = [exc] * len(part)
            for i, out in zip(idx, outs):
                results[i] = out
        return results

    def _call(self, jobs, sampling, seed):
        with self._one_call:
            return run_call(self.gen, jobs, sampling, seed)

    async def _run(self, job: ChatJob) -> list:
        try:
            outs = await self._batched(job)
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if isinstance(outs, Exception):
            raise outs
        return outs

    # ------------------------------------------------------------ the request path

    def _job(self, req: ChatCompletionRequest) -> ChatJob:
        c = self.cfg
        check_count(len(req.messages), c.max_items_per_request, "messages")
        most = min(c.max_items_per_request, c.max_batch_size)
        if req.n > most:
            raise ServeRequestError(413, f"n={req.n} choices is more than {most} (serve.max_items_per_request, "
                                         "serve.max_batch_size)", "n")
        messages, _ = cut_messages(req.messages, c.max_text_chars, c.overlong, "messages")
        conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
        prompt = self._render(conversation)
        if len(prompt) >= self.context:
            raise ServeRequestError(413, f"the messages take {len(prompt)} tokens; the model's context is "
                                         f"{self.context}", "messages")
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        budget = req.max_completion_tokens or req.max_tokens or self.defaults.max_new_tokens
        if budget > self.context - len(prompt):
            raise ServeRequestError(422, f"{field}={budget} is more than the {self.context - len(prompt)} tokens "
                                         f"the model's context leaves after the prompt", field)
        d = self.defaults
        temperature = d.temperature if req.temperature is None else req.temperature
        temperature = 0.0 if temperature < GREEDY_BELOW else temperature  # logits / 1e-300 overflow to NaN
        sampling = replace(d, max_new_tokens=budget, temperature=temperature,
                           top_p=d.top_p if req.top_p is None else req.top_p)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        trackers = [TextTracker(self.gen.tokenizer, budget, stop) for _ in range(req.n)]
        return ChatJob(conversation, self._settings(req), sampling, req.seed, trackers, prompt_tokens=len(prompt))

    def _render(self, conversation: list[dict]) -> list[int]:
        """The prompt's token ids, whole (as the generator renders a prompt that fits its max_prompt_tokens)."""
        from sparserm.align.engines.base import render

        try:
            return render(self.gen.tokenizer, conversation, self.gen.map.cfg.model.chat_template)
        except Exception as exc:  # a conversation the template cannot render is the caller's error
            raise ServeRequestError(422, f"cannot render the messages: {exc}", "messages") from None

    def _settings(self, req: ChatCompletionRequest):
        st = req.steering
        if st is None:
            return self.gen.settings()
        changes = {k: getattr(st, k) for k in ("alpha", "mode", "k_prompt", "k_diff") if getattr(st, k) is not None}
        return self.gen.settings(**changes, enabled=st.enabled)

    async def _chat(self, req: ChatCompletionRequest):
        from starlette.responses import StreamingResponse

        # validated, rendered and tokenized in a thread: a long conversation does not hold up the event loop
        job, rid, created = await asyncio.to_thread(self._job, req), f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        model = req.model or self.model_name
        if not req.stream:
            return completion(job, await self._run(job), rid, created, model)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job.emit = lambda c, text: loop.call_soon_threadsafe(queue.put_nowait, (c, text))
        task = asyncio.ensure_future(self._run(job))
        task.add_done_callback(lambda _: queue.put_nowait(None))  # after every text the call handed over
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(self._events(job, task, queue, Chunks(rid, created, model), include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _events(self, job: ChatJob, task, queue, chunks: Chunks, include_usage: bool):
        try:
            yield chunks.opening(job.n)
            while (item := await queue.get()) is not None:
                yield chunks.text(*item)
            try:
                for line in chunks.closing(job, task.result(), include_usage):
                    yield line
            except Exception as exc:
                logger.exception("streamed chat completion failed")
                status = exc.status if isinstance(exc, ServeRequestError) else 500
                detail = exc.message if status != 500 else f"generation failed ({type(exc).__name__})"
                yield event(StreamError(error=ErrorBody(detail=detail, field=getattr(exc, "field", None)),
                                        status=status))
            yield DONE
        finally:
            if not task.done():  # the caller went away mid-stream: its rows end at their next token
                job.cancelled = True

    # ------------------------------------------------------------ HTTP

    def __serve_build_asgi_app__(self):
        app = guarded_app(self.guard, schemas=STREAM_SCHEMAS, title="SparseRM steered chat", version="1",
                          description="OpenAI-compatible chat completions steered by a DSPA-style map of SAE "
                                      "features. Bearer auth on every route but /healthz when the server was "
                                      "started with a token. Every error body is ErrorBody.")
        server = self
        add_health(app, server.model_name)

        @app.get("/v1/models", response_model=ModelList)
        async def models() -> ModelList:
            return ModelList(data=[ModelCard(id=server.model_name, created=server.created, root=server.root)])

        @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAM_RESPONSE)
        async def chat_completions(req: ChatCompletionRequest):
            return await server._chat(req)

        return app


SteerDeployment = serve.deployment(name="SparseRMSteer")(serve.ingress()(SteerServer))


def build_steer_app(map_dir: str | Path, cfg: ServeConfig | None = None, *, token: str | None = ENV):
    """The bound application for ``serve.run`` (``token`` as in :func:`sparserm.serve.app.build_app`)."""
    from sparserm.steering.store import MANIFEST, MAP_FILE
    from sparserm.storage import fetched, portable

    cfg = validate_serve(cfg or ServeConfig())
    map_dir = portable(map_dir)  # a URI: each replica pulls it (the map folder holds its SAEs)
    here = fetched(map_dir)
    if not ((here / MANIFEST).is_file() and (here / MAP_FILE).is_file()):
        raise FileNotFoundError(f"{map_dir} is not a steering-map folder (no {MANIFEST} and {MAP_FILE}); build one "
                                "with `sparserm steer build`")
    digest = token_digest(token, cfg.auth_env)
    return SteerDeployment.options(**deployment_options(cfg)).bind(map_dir, cfg, digest)


def start_steer(map_dir: str | Path, cfg: ServeConfig | None = None, *, name: str = APP_NAME,
                route_prefix: str = "/", token: str | None = ENV, blocking: bool = False):
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` (a no-op when Serve already runs) and deploy the app.
    Returns its ``DeploymentHandle``."""
    cfg = validate_serve(cfg or ServeConfig())
    bind(cfg.host, cfg.port)
    return serve.run(build_steer_app(map_dir, cfg, token=token), name=name, route_prefix=route_prefix,
                     blocking=blocking)


def start_all(rm_dir: str | Path, map_dir: str | Path, cfg: ServeConfig | None = None, *, rm_prefix: str = "/rm",
              steer_prefix: str = "/", rm_name: str = "sparserm", steer_name: str = APP_NAME,
              token: str | None = ENV) -> list:
    """``sparserm serve all``: the reward-model app at ``rm_prefix`` and the steered chat app at ``steer_prefix``,
    two Serve applications on one HTTP proxy with one config and token, started together (``serve.run_many``).
    Both folders are checked before either starts. Returns both ``DeploymentHandle``\\ s."""
    from ray.serve.api import RunTarget

    from sparserm.serve.app import build_app

    cfg = validate_serve(cfg or ServeConfig())
    rm_app, steer_app = build_app(rm_dir, cfg, token=token), build_steer_app(map_dir, cfg, token=token)
    bind(cfg.host, cfg.port)
    return serve.run_many([RunTarget(rm_app, name=rm_name, route_prefix=rm_prefix),
                           RunTarget(steer_app, name=steer_name, route_prefix=steer_prefix)])
