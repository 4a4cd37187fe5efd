"""The steered chat service's batch: requests (``ChatJob``) grouped into ``SteeredGenerator.generate`` calls.

A batch of jobs from ``@serve.batch`` runs as few generate calls as their sampling allows, one after another:

* greedy jobs (temperature 0) share one call whatever their token budgets;
* sampled jobs without a seed share one call per (temperature, top_p);
* a sampled job with a seed gets a call of its own, seeded with it, so it gives what it gives alone.

Each row carries its own steering settings (the hook computes each row's vector from its own prompt), each choice
its own :class:`~sparserm.serve.detok.TextTracker` (its budget, stop strings and text), and a call runs to the
longest budget of its rows while ``on_token`` ends each row at its own. Row counts are what the batch's
``max_batch_size`` counts (:func:`job_rows`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable

from sparserm.align.engines.base import Sampling
from sparserm.serve.detok import TextTracker
from sparserm.steering.vector import SteerSettings


@dataclass
class ChatJob:
    """One chat request: ``n`` rows of one conversation."""

    conversation: list[dict]
    settings: SteerSettings  # the resolved settings (reported even when enabled is False)
    sampling: Sampling  # max_new_tokens: this request's budget
    seed: int | None
    trackers: list[TextTracker]  # one per choice
    emit: Callable[[int, str], None] | None = None  # streaming: (choice, text) from the generating thread
    cancelled: bool = False  # the caller is gone: its rows end at their next token
    prompt_tokens: int = 0

    @property
    def n(self) -> int:
        return len(self.trackers)

    @property
    def steered(self) -> SteerSettings | None:
        return self.settings if self.settings.enabled else None


def job_rows(jobs: list[ChatJob]) -> int:
    """``@serve.batch(batch_size_fn=...)``: a batch's size in generated rows."""
    return sum(j.n for j in jobs)


def plan(jobs: list[ChatJob]) -> list[tuple[list[int], Sampling, int]]:
    """The generate calls of a batch: (indices of the jobs, sampling, seed) each, in first-come order."""
    groups: dict[tuple, list[int]] = {}
    for i, j in enumerate(jobs):
        s = j.sampling
        if s.temperature <= 0:
            key: tuple = ("greedy",)
        elif j.seed is not None:
            key = ("seeded", i)
        else:
            key = ("sampled", s.temperature, s.top_p)
        groups.setdefault(key, []).append(i)
    calls = []
    for key, idx in groups.items():
        first = jobs[idx[0]]
        budget = max(jobs[i].sampling.max_new_tokens for i in idx)
        seed = first.seed if key[0] == "seeded" else random.randrange(2 ** 31)
        calls.append((idx, replace(first.sampling, max_new_tokens=budget), seed))
    return calls


def run_call(generator, jobs: list[ChatJob], sampling: Sampling, seed: int) -> list[list]:
    """One generate call over the rows of ``jobs`` (in a worker thread); per job its choices' ``SteeredOutput``."""
    owners = [(j, c) for j in jobs for c in range(j.n)]

    def on_token(row: int, token: int) -> bool:
        job, c = owners[row]
        if job.cancelled:
            return True
        tracker = job.trackers[c]
        text = tracker.add(token)
        if text and job.emit is not None:
            job.emit(c, text)
        return tracker.done

    outs = generator.generate([j.conversation for j, _ in owners], [j.steered for j, _ in owners], sampling,
                              seed=seed, on_token=on_token)
    per_job, i = [], 0
    for j in jobs:
        per_job.append(outs[i: i + j.n])
        i += j.n
    return per_job
