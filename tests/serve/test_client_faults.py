"""A reward-model replica killed (SIGKILL) under load: the clients that retry (``HTTPRewardClient`` and the TRL
reward function ``SparseRMReward``) lose no request, no answer differs from in-process scoring, and Serve replaces
the replica. Its own app of two replicas on the session's HTTP proxy, deleted at the end."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.faults import alive_pids, gone, kill, wait_for
from tests.serve.conftest import LIMITS
from tests.serve.test_http import PROMPTS, RESPONSES

APP, N_REQUESTS = "sparserm-faults", 64


def test_a_replica_killed_under_load_loses_no_request_and_changes_no_answer(ray_session, rm_dir, rm, serve_port):
    from ray import serve

    from sparserm.serve import HTTPRewardClient, SparseRMReward
    from sparserm.serve.app import start
    from sparserm.serve.config import ServeConfig

    replica = f"ServeReplica:{APP}:"
    # request i: two items, through the HTTP client (even i) or the TRL reward function (odd i)
    sent = [([PROMPTS[i % 3], PROMPTS[(i + 1) % 3]], [f"{RESPONSES[(i + 2) % 3]} {i}", RESPONSES[i % 3]])
            for i in range(N_REQUESTS)]
    expected = [rm.score(p, r) for p, r in sent]
    start(rm_dir, ServeConfig(port=serve_port, replicas=2, **LIMITS), name=APP, route_prefix="/faults", token=None)
    try:
        before = wait_for(lambda: len(alive_pids(replica)) == 2 and alive_pids(replica), "two live replicas")
        url = f"http://127.0.0.1:{serve_port}/faults"
        http, trl = HTTPRewardClient(url), SparseRMReward(url)
        answered: list[int] = []

        def send(i: int) -> list[float]:
            prompts, responses = sent[i]
            out = http.score(prompts, responses) if i % 2 == 0 else trl(prompts=prompts, completions=responses)
            answered.append(i)
            return out

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(send, i) for i in range(N_REQUESTS)]
            wait_for(lambda: len(answered) >= 8, "the first answers")
            victim = sorted(before.values())[0]
            kill(victim)
            at_kill = len(answered)
            got = [f.result() for f in futures]
        assert gone(victim) and at_kill < N_REQUESTS  # killed while requests were still to come
        assert sorted(answered) == list(range(N_REQUESTS))
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g == pytest.approx(e, abs=1e-5), f"request {i}"
        # Serve replaces the dead replica: two live ones again, the killed process not among them
        after = wait_for(lambda: len(p := alive_pids(replica)) == 2 and victim not in p.values() and p,
                         "a replacement replica")
        assert set(after.values()) != set(before.values())
    finally:
        serve.delete(APP)
