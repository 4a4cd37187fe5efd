"""Actor work in chunks for the driver's progress bar (``sparserm.align.engines.gather``): the chunks cover
every item once, results come back in item order whatever order the chunks finish in, the bar counts every
item, and the engine pool's chunked generation is what the engine gives for each chunk at its own seed."""
import time

import pytest

from sparserm.align.engines.gather import chunked_call, gather, spans


class Counter:  # the part of a tqdm bar that gather uses
    def __init__(self):
        self.n, self.steps = 0, []

    def update(self, k):
        self.n += k
        self.steps.append(k)


@pytest.mark.parametrize("n,min_size,max_chunks", [(0, 4, 16), (1, 4, 16), (10, 4, 16), (100, 4, 16),
                                                   (1000, 1, 16), (7, 1, 3)])
def test_spans_cover_every_item_once_in_at_most_max_chunks(n, min_size, max_chunks):
    got = spans(n, min_size, max_chunks)
    assert [i for s, e in got for i in range(s, e)] == list(range(n))
    assert len(got) <= max_chunks
    assert all(e - s >= min(min_size, n) for s, e in got[:-1])


def test_gather_returns_in_call_order_and_counts_every_item(ray_session):
    import ray

    @ray.remote
    def slow(x, delay):
        time.sleep(delay)
        return x

    bar = Counter()
    # the first call finishes last
    calls = [(slow.remote("a", 1.0), 3), (slow.remote("b", 0.0), 5), (slow.remote("c", 0.2), 2)]
    assert gather(calls, bar) == ["a", "b", "c"]
    assert bar.n == 10 and bar.steps[-1] == 3


def test_chunked_call_joins_the_chunks_results_in_item_order(ray_session):
    import ray

    @ray.remote
    class Doubler:
        def __init__(self):
            self.calls = 0

        def double(self, xs, offset):
            self.calls += 1
            return [2 * x + offset for x in xs]

        def n_calls(self):
            return self.calls

    actor, bar = Doubler.remote(), Counter()
    assert chunked_call(actor.double, list(range(40)), 1, min_size=4, bar=bar) == [2 * x + 1 for x in range(40)]
    assert bar.n == 40 and ray.get(actor.n_calls.remote()) == 10  # 40 items, chunks of 4
    assert chunked_call(actor.double, [], 0) == []


def test_engine_pool_chunks_are_the_engines_own_answers_at_their_seeds(ray_session, tiny_model_dir, cache_dir):
    """Through the transformers engine on the tiny model: 10 prompts, batch size 3 -> 4 chunks; each chunk's
    answers are what the engine gives that chunk called alone with seed ``seed + start``, and the bar counts
    all 10."""
    import ray

    from sparserm.align.engines.factory import EnginePool
    from sparserm.align.engines.hf import HFPolicy
    from sparserm.config import ModelConfig, to_dict

    model = to_dict(ModelConfig(name=str(tiny_model_dir), layer=1, chat_template=False))
    engine = ray.remote(HFPolicy).options(num_cpus=1).remote(model, str(cache_dir), 1)
    convs = [[{"role": "user", "content": f"Tell me about bread number {i}" + " please" * (i % 4)}]
             for i in range(10)]
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "max_prompt_tokens": 64}
    try:
        bar = Counter()
        got = EnginePool("hf", [engine]).generate(convs, sampling, seed=7, batch_size=3, bar=bar)
        assert bar.n == 10 and bar.steps == [3, 3, 3, 1]
        alone = []
        for s, e in spans(10, 3):
            alone += ray.get(engine.generate.remote(convs[s:e], sampling, 7 + s, 3))
        assert got == alone
        assert len({g["text"] for g in got}) > 1  # sampled: the seeds differ per chunk
    finally:
        ray.kill(engine)
