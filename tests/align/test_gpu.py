"""The GPU path: vLLM generation with a LoRA adapter handed over per round, and DPO under DeepSpeed on CUDA
(bf16, NCCL). Skipped without a CUDA GPU (see tests/conftest.py), never faked."""
from pathlib import Path

import pytest


pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_cfg(tiny_align_config):
    return tiny_align_config("align.train.epochs=2", "align.train.num_gpus=1", "align.generate.engine=vllm")


def test_dpo_on_cuda_with_deepspeed(gpu_cfg, ray_session, tmp_path, dpo_pairs):
    from sparserm.align.trainer import train_dpo

    res = train_dpo(gpu_cfg, dpo_pairs, storage_dir=tmp_path, name="dpo-gpu", progress=False)
    assert res["finished"] and len(res["history"]) == 2
    assert res["history"][-1]["base_checksum"] == pytest.approx(res["history"][-1]["base_checksum_after"])
    assert (Path(res["adapter"]) / "adapter_model.safetensors").is_file()
    test_dpo_on_cuda_with_deepspeed.adapter = res["adapter"]


def test_vllm_generates_with_and_without_adapter(gpu_cfg, tmp_path):
    from sparserm.align.engines.vllm import VLLMEngine
    from sparserm.config import to_dict

    adapter = getattr(test_dpo_on_cuda_with_deepspeed, "adapter", None)
    if adapter is None:
        pytest.skip("needs the adapter of test_dpo_on_cuda_with_deepspeed")
    eng = VLLMEngine(to_dict(gpu_cfg.model), gpu_cfg.run.cache_dir, gpu_memory_utilization=0.3, max_model_len=256,
                     max_lora_rank=8)
    convs = [[{"role": "user", "content": "How do I bake bread?"}]] * 4
    sampling = {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "max_prompt_tokens": 32}
    base = eng.generate(convs, sampling, seed=0)
    assert len(base) == 4 and all(0 < g["n_tokens"] <= 8 for g in base)
    eng.set_adapter(adapter)
    assert eng.lora is not None and eng.lora.lora_path == adapter
    tuned = eng.generate(convs, sampling, seed=0)
    assert len(tuned) == 4


def test_vllm_copies_of_a_prompt_give_different_samples(gpu_cfg):
    """The labellers ask for two (or n) samples of one prompt: each request must carry its own seed."""
    from sparserm.align.engines.vllm import VLLMEngine
    from sparserm.config import to_dict

    eng = VLLMEngine(to_dict(gpu_cfg.model), gpu_cfg.run.cache_dir, gpu_memory_utilization=0.3, max_model_len=256,
                     max_lora_rank=8)
    convs = [[{"role": "user", "content": "Tell me a story."}]] * 4
    sampling = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "max_prompt_tokens": 32}
    texts = [g["text"] for g in eng.generate(convs, sampling, seed=3)]
    assert len(set(texts)) > 1
    assert [g["text"] for g in eng.generate(convs, sampling, seed=3)] == texts  # and reproducibly so
    eng.sleep()
    assert eng.asleep
    assert len(eng.generate(convs[:1], sampling, seed=3)) == 1 and not eng.asleep  # generate wakes it
