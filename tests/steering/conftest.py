"""Fixtures of the steering tests: two tiny random SAEs on the tiny model (input after block 1, output after block 2),
a small file of preference triples, configs over them, and one map built from them for the session."""
from __future__ import annotations

import json

import pytest

from sparserm.config import load_config
from sparserm.testing import build_tiny_sae

TRIPLES = [{"prompt": f"How do I bake bread, take {i}?" if i % 2 else f"Tell me about Paris, part {i}.",
            "chosen": "Mix flour, water and yeast, then bake it." if i % 3 else "Paris is a city in Europe.",
            "rejected": "I won't help with that." if i % 3 else "Please ask something else."} for i in range(14)]


@pytest.fixture(scope="session")
def tiny_saes(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer-saes")
    return build_tiny_sae(root / "input", layer=1, seed=1), build_tiny_sae(root / "output", layer=2, seed=2)


@pytest.fixture(scope="session")
def triples_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("steer-data") / "triples.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TRIPLES))
    return path


@pytest.fixture(scope="session")
def steer_overrides(tiny_model_dir, cache_dir, tiny_saes, triples_file):
    return [f"model.name={tiny_model_dir}", f"run.cache_dir={cache_dir}", "model.device=cpu",
            f"steer.data=[{{path: '{triples_file}'}}]", "steer.max_triples=0", f"steer.input_sae_dir={tiny_saes[0]}",
            f"steer.output_sae_dir={tiny_saes[1]}", "steer.k_prompt=8", "steer.k_diff=6", "steer.top_per_row=16",
            "steer.num_cpus=1", "steer.batch_size=4", "align.generate.max_new_tokens=10",
            "align.generate.max_prompt_tokens=64"]


@pytest.fixture(scope="session")
def steer_config(steer_overrides):
    def make(*extra):
        return load_config(None, [*steer_overrides, *extra])

    return make


@pytest.fixture(scope="session")
def steer_map(tmp_path_factory, steer_config, ray_session):
    from sparserm.steering.build import build_map

    return build_map(steer_config(), tmp_path_factory.mktemp("steer-map") / "map", progress=False)
