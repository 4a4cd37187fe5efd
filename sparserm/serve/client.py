"""Python access to the running service for cluster jobs.

* :class:`RewardClient` — through a Ray Serve ``DeploymentHandle`` (inside the Ray cluster; no HTTP, no auth).
* :class:`HTTPRewardClient` — through HTTP (anywhere; sends the bearer token when given).
* :func:`score_dataset` — a Ray Data stage: adds a score column to a dataset of (prompt, response) rows.
* :class:`SparseRMReward` — a reward function for TRL's ``GRPOTrainer(reward_funcs=...)``.

Scoring is a pure function of the request, so every client retries failed calls (replica restarts, lost
connections, 5xx, back-pressure) with backoff; requests the server rejects (4xx / ``ServeRequestError``) are
raised at once. Large calls are cut into chunks of at most ``max_items_per_request`` items.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from sparserm.serve.errors import ServeRequestError

DEFAULT_CHUNK = 256
RETRIED_4XX = (408, 429)  # the answers of an overloaded service, not of a bad request: retried as 5xx are
MAX_RETRY_AFTER_S = 30.0  # the longest Retry-After a client waits out


class _Busy(Exception):
    """An overloaded service's answer (``RETRIED_4XX``): retried, after its Retry-After when it gives one."""

    def __init__(self, error: ServeRequestError, retry_after_s: float):
        super().__init__(error.message)
        self.error, self.retry_after_s = error, retry_after_s


def _retry(call: Callable[[], Any], retries: int, backoff_s: float) -> Any:
    for attempt in range(retries + 1):
        try:
            return call()
        except ServeRequestError:
            raise
        except _Busy as busy:
            if attempt == retries:
                raise busy.error from None  # the service's own status and words
            time.sleep(max(backoff_s * (2 ** attempt), busy.retry_after_s))
        except Exception:
            if attempt == retries:
                raise
            time.sleep(backoff_s * (2 ** attempt))


def _items(prompts, responses) -> list[dict]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]


class _Base:
    chunk: int = DEFAULT_CHUNK

    def _call(self, op: str, key: str, rows: list) -> list[dict]:
        raise NotImplementedError

    def score_items(self, items: list[dict]) -> list[float]:
        return [s for out in self._call("score", "items", items) for s in out["scores"]]

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        """Scores of (prompt, response) pairs; a prompt is a string or a list of chat messages."""
        return self.score_items(_items(prompts, responses))

    def compare(self, prompts: list, chosen: list[str], rejected: list[str]) -> list[float]:
        """score(chosen) - score(rejected), per pair."""
        pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, chosen, rejected, strict=True)]
        return [m for out in self._call("compare", "pairs", pairs) for m in out["margins"]]

    def get_reward(self, queries: list[str]) -> list[float]:
        """OpenRLHF-style: full templated texts -> rewards."""
        return [r for out in self._call("get_reward", "query", queries) for r in out["rewards"]]


class RewardClient(_Base):
    """``RewardClient("sparserm").score(prompts, responses)`` through the app's ``DeploymentHandle``."""

    def __init__(self, app_name: str = "sparserm", *, retries: int = 5, backoff_s: float = 0.5,
                 timeout_s: float | None = 300.0):
        self.app_name, self.retries, self.backoff_s, self.timeout_s = app_name, retries, backoff_s, timeout_s
        self._handle = None
        self._chunk: int | None = None

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}

    @property
    def handle(self):
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_app_handle(self.app_name)
        return self._handle

    def info(self) -> dict:
        return _retry(lambda: self.handle.info.remote().result(timeout_s=self.timeout_s), self.retries, self.backoff_s)

    @property
    def chunk(self) -> int:
        if self._chunk is None:
            self._chunk = int(self.info()["max_items_per_request"])
        return self._chunk

    def _call(self, op: str, key: str, rows: list) -> list[dict]:
        def one(part):
            return _retry(lambda: getattr(self.handle, op).remote(part).result(timeout_s=self.timeout_s),
                          self.retries, self.backoff_s)

        n = self.chunk
        return [one(rows[i: i + n]) for i in range(0, len(rows), n)]


class HTTPRewardClient(_Base):
    """``HTTPRewardClient("http://127.0.0.1:8000", token=...)``; thread-safe (one session per thread)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, token: str | None = None, retries: int = 5,
                 backoff_s: float = 0.5, timeout_s: float = 300.0, chunk: int = DEFAULT_CHUNK):
        self.url, self.token, self.retries, self.backoff_s = url.rstrip("/"), token, retries, backoff_s
        self.timeout_s, self.chunk = timeout_s, chunk
        self._local = threading.local()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _session(self):
        import requests

        if getattr(self._local, "session", None) is None:
            self._local.session = requests.Session()
        return self._local.session

    def post(self, path: str, body: Any) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}

        def once():
            r = self._session().post(self.url + path, json=body, headers=headers, timeout=self.timeout_s)
            if 400 <= r.status_code < 500:
                try:
                    err = r.json()
                except ValueError:
                    err = {"detail": r.text}
                error = ServeRequestError(r.status_code, str(err.get("detail")), err.get("field"))
                if r.status_code in RETRIED_4XX:  # Serve's proxy: a request timeout, back-pressure
                    wait = r.headers.get("Retry-After", "")
                    raise _Busy(error, min(float(wait), MAX_RETRY_AFTER_S) if wait.replace(".", "", 1).isdigit()
                                else 0.0)
                raise error
            r.raise_for_status()  # 5xx: retried
            return r.json()

        return _retry(once, self.retries, self.backoff_s)

    def _call(self, op: str, key: str, rows: list) -> list[dict]:
        path = {"score": "/v1/score", "compare": "/v1/compare", "get_reward": "/get_reward"}[op]
        n = self.chunk
        return [self.post(path, {key: rows[i: i + n]}) for i in range(0, len(rows), n)]


def _client(url: str | None, app_name: str | None, token: str | None):
    if url is not None:
        return HTTPRewardClient(url, token=token)
    return RewardClient(app_name or "sparserm")


class ScoreBatch:
    """Ray Data ``map_batches`` callable: adds ``out_col`` with the service's scores."""

    def __init__(self, app_name: str | None = "sparserm", url: str | None = None, token: str | None = None,
                 prompt_col: str = "prompt", response_col: str = "response", out_col: str = "score"):
        self.client = _client(url, app_name, token)
        self.prompt_col, self.response_col, self.out_col = prompt_col, response_col, out_col

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        prompts = [p if isinstance(p, str) else list(p) for p in batch[self.prompt_col]]
        scores = self.client.score(prompts, [str(r) for r in batch[self.response_col]])
        return {**batch, self.out_col: np.asarray(scores, dtype=np.float64)}


def score_dataset(ds, *, app_name: str | None = "sparserm", url: str | None = None, token: str | None = None,
                  prompt_col: str = "prompt", response_col: str = "response", out_col: str = "score",
                  batch_size: int = 64, concurrency: int = 1, num_cpus: float = 0.25):
    """``ds`` with a float64 column ``out_col`` scored by the running service (``url`` for HTTP, else the
    ``app_name`` handle). The stage's actors only wait on the service, hence the small ``num_cpus``."""
    return ds.map_batches(ScoreBatch, fn_constructor_kwargs=dict(app_name=app_name, url=url, token=token,
                                                                 prompt_col=prompt_col, response_col=response_col,
                                                                 out_col=out_col),
                          batch_size=batch_size, concurrency=concurrency, num_cpus=num_cpus, batch_format="numpy")


def _text(content) -> str:
    """A message content: a string, or a list of parts of which the text parts are kept (None, an assistant
    turn that only calls tools, is no text)."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return str(content)


def _completion_text(c) -> str:
    """TRL completion: a string, or (conversational) a list of assistant messages."""
    return c if isinstance(c, str) else "".join(_text(m.get("content", "")) for m in c)


class SparseRMReward:
    """A TRL reward function: ``GRPOTrainer(reward_funcs=SparseRMReward(url=...))``.

    TRL calls ``reward_func(prompts=..., completions=..., completion_ids=..., **dataset_columns_and_state)``
    (trl/trainer/grpo_trainer.py, ``_calculate_rewards``); prompts are strings or chat-message lists, and
    completions strings or lists of assistant messages. Returns one float per completion. Logged under
    ``__name__`` (TRL's ``get_callable_name``)."""

    def __init__(self, url: str | None = None, *, app_name: str | None = None, token: str | None = None,
                 name: str = "sparserm"):
        if url is None and app_name is None:
            raise ValueError("give the service's url (HTTP) or app_name (DeploymentHandle)")
        self.url, self.app_name, self.token, self.__name__ = url, app_name, token, name
        self._client = None

    def __getstate__(self):
        return {**self.__dict__, "_client": None}

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        if self._client is None:
            self._client = _client(self.url, self.app_name, self.token)
        prompts = [p if isinstance(p, str) else [{"role": m["role"], "content": _text(m["content"])} for m in p]
                   for p in prompts]
        return self._client.score(prompts, [_completion_text(c) for c in completions])
