import pytest

from sparserm.config import load_config

PAIRS = [{"prompt": f"How do I bake bread, take {i}?", "chosen": "Mix flour, water and yeast, then bake it.",
          "rejected": "I won't help with that."} for i in range(8)]


@pytest.fixture(scope="module")
def dpo_pairs():
    return [dict(p) for p in PAIRS]


@pytest.fixture(scope="module")
def tiny_align_config(tiny_model_dir, cache_dir):
    """Builds a DPO config for the tiny model (2 pairs a micro-batch, 4 a step) plus overrides."""
    def make(*extra):
        return load_config(None, [f"model.name={tiny_model_dir}", f"run.cache_dir={cache_dir}", "align.train.batch_size=4",
                                  "align.train.micro_batch_size=2", "align.generate.max_new_tokens=16",
                                  "align.generate.max_prompt_tokens=96", *extra])

    return make


@pytest.fixture(autouse=True)
def nothing_left_holding_cpus(request):
    """After each test, every CPU of the test session's Ray is free again (within 30 s): an actor or worker
    group that outlives its test fails that test here, instead of leaving a later Ray Train run waiting
    for CPUs that never free."""
    yield
    import time

    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0.0) < total - 1e-6 and time.time() < deadline:
        time.sleep(0.5)
    free = ray.available_resources().get("CPU", 0.0)
    assert free >= total - 1e-6, f"{request.node.name} left {total - free:g} of {total:g} CPUs held"
