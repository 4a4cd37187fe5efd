"""The steered chat replica's batch without Serve's proxy: concurrent requests share generate calls by the grouping
rules and each gets what it gets alone; and the text tracker's stop strings, budget and stream deltas.
(The replica's class runs here in-process; ``@serve.batch`` only asks the replica context for a warning.)"""
from __future__ import annotations

import asyncio

import pytest
import torch

from tests.serve.conftest import ASK, JOKE, LIMITS


@pytest.fixture(scope="module")
def server(steer_map):
    from types import SimpleNamespace

    from ray import serve

    from sparserm.serve.config import ServeConfig
    from sparserm.serve.steer_app import SteerServer

    threads = torch.get_num_threads()
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serve, "get_replica_context", lambda: context)
        server = SteerServer(str(steer_map), ServeConfig(**{**LIMITS, "batch_wait_timeout_s": 0.2}))
        calls = []
        generate = server.gen.generate

        def recorded(conversations, *args, **kwargs):  # the real generate, with a record of each call's rows
            calls.append(len(conversations))
            return generate(conversations, *args, **kwargs)

        server.gen.generate, server.calls = recorded, calls
        yield server
    torch.set_num_threads(threads)


def request(messages, steering=None, **kw):
    from sparserm.serve.chat_schema import ChatCompletionRequest

    return ChatCompletionRequest(messages=messages, steering=steering, **{"temperature": 0.0, **kw})


async def answer(server, reqs):
    """The completions of ``reqs`` sent at once (they queue to the same batch)."""
    from sparserm.serve.chat_answer import completion

    jobs = [server._job(r) for r in reqs]
    outs = await asyncio.gather(*[server._run(j) for j in jobs])
    return [{k: completion(j, o, "id", 0, "m").model_dump()[k] for k in ("choices", "usage", "steering")}
            for j, o in zip(jobs, outs)]


def test_requests_share_a_call_and_get_what_they_get_alone(server):
    reqs = [request(ASK, {"alpha": 2.0}), request(JOKE, {"alpha": 1.0, "mode": "ablate", "k_diff": 3}),
            request(JOKE, {"alpha": 3.0, "k_diff": 40}, max_tokens=4), request(ASK, {"enabled": False}, n=2),
            request(JOKE, {"alpha": 3.0, "k_diff": 40}, temperature=1.0, seed=5, max_tokens=6),
            request(JOKE, {"alpha": 0.5}, temperature=1.0, seed=9, n=2, max_tokens=6)]

    async def go():  # one event loop: the batch queue lives on it
        alone = []
        for r in reqs:
            server.calls.clear()
            alone.append((await answer(server, [r]))[0])
            assert server.calls == [r.n]
        server.calls.clear()
        return alone, await answer(server, reqs)

    alone, together = asyncio.run(go())
    # 8 rows in batches of at most max_batch_size 4 rows: the first three greedy requests, whatever their budgets
    # and steering, share one call; each seeded request has a call of its own
    assert server.calls[0] == 3 and sorted(server.calls) == [1, 2, 2, 3]
    assert together == alone
    assert together[2]["usage"]["completion_tokens"] == 4 and together[2]["choices"][0]["finish_reason"] == "length"
    assert together[2]["steering"]["edited_tokens"] > 0 and together[3]["steering"]["edited_tokens"] == 0


def test_plan_groups_by_sampling():
    from sparserm.align.engines.base import Sampling
    from sparserm.serve.chat_batch import ChatJob, plan

    def job(t, seed=None, budget=5, top_p=0.9):
        return ChatJob(ASK, None, Sampling(budget, t, top_p, 64), seed, [None])

    jobs = [job(0.0, budget=3), job(0.7), job(0.0, seed=4, budget=9), job(0.7, seed=1), job(0.7, seed=2),
            job(0.7, top_p=0.5), job(0.7)]
    calls = plan(jobs)
    assert [idx for idx, _, _ in calls] == [[0, 2], [1, 6], [3], [4], [5]]
    assert calls[0][1].max_new_tokens == 9 and calls[0][1].temperature == 0.0  # the longest budget of the call
    assert [seed for _, _, seed in calls[2:4]] == [1, 2]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def feed(tracker, ids):
    deltas = []
    for t in ids:
        deltas.append(tracker.add(t))
        if tracker.done:
            break
    deltas.append(tracker.finish())
    return deltas


def test_tracker_stop_strings_budget_and_deltas(tokenizer):
    from sparserm.serve.detok import TextTracker

    ids = tokenizer(" Mix flour, water and yeast, then bake it.  ", add_special_tokens=False)["input_ids"]
    whole = TextTracker(tokenizer, 100)
    deltas = feed(whole, ids)
    assert whole.text == "Mix flour, water and yeast, then bake it." == "".join(deltas) and not whole.hit_stop
    assert sum(1 for d in deltas if d) > 3  # released as it came, not at the end
    stopped = TextTracker(tokenizer, 100, ("yeast", "zzz"))
    deltas = feed(stopped, ids)
    assert stopped.text == "Mix flour, water and" == "".join(deltas) and stopped.hit_stop
    assert not any("ye" in d for d in deltas)  # a tail that may become the stop string is held back
    budget = TextTracker(tokenizer, 3)
    feed(budget, ids)
    assert budget.done and not budget.hit_stop and len(budget.ids) == 3
    assert budget.text == tokenizer.decode(ids[:3]).strip()
    ufo = tokenizer("é", add_special_tokens=False)["input_ids"]  # one character of two bytes, one token each
    t = TextTracker(tokenizer, 100)
    assert len(ufo) == 2 and [t.add(i) for i in ufo] == ["", "é"]  # never half a character


def test_cli_parses_steer_and_all():
    from sparserm.cli import build_parser
    from sparserm.serve.cli import cmd_serve_all, cmd_serve_steer

    args = build_parser().parse_args(["serve", "steer", "MAP", "serve.max_batch_size=8", "--port", "9002"])
    assert args.func is cmd_serve_steer and (args.map_dir, args.port, args.overrides, args.name) == (
        "MAP", 9002, ["serve.max_batch_size=8"], "sparserm-steer")
    args = build_parser().parse_args(["serve", "all", "RM", "MAP", "--replicas", "2", "--steer-prefix", "/chat"])
    assert args.func is cmd_serve_all and (args.rm_dir, args.map_dir, args.replicas) == ("RM", "MAP", 2)
    assert (args.rm_prefix, args.steer_prefix, args.rm_name, args.steer_name) == ("/rm", "/chat", "sparserm",
                                                                                 "sparserm-steer")
