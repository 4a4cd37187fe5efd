"""The vLLM engine (GPU): the base model loaded once per engine, each round's LoRA adapter handed over as a
``LoRARequest`` (no weight broadcast). Created by :mod:`sparserm.align.engines.factory` inside a placement
group bundle per tensor-parallel rank, with a GPU share from config, so that it can share one GPU with the
scorer, the evaluator and the DPO workers: ``sleep`` (level 1: weights to CPU, KV cache dropped) frees its
memory while DPO trains, ``wake_up`` brings it back before the next generation.

Every request carries its own seed (``seed`` + its index): vLLM seeds each request's sampler separately,
so one seed for all would give identical samples for the copies of a prompt that a labeller asks for.
"""
from __future__ import annotations

import os

from sparserm.align.engines.base import Sampling, render_prompts


def request_seeds(seed: int, n: int) -> list[int]:
    """One sampler seed per request, so that copies of one prompt give different samples."""
    return [seed + i for i in range(n)]


class VLLMEngine:
    def __init__(self, model_cfg: dict, cache_dir: str, *, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, max_model_len: int = 2048, max_lora_rank: int = 16,
                 seed: int = 0, enable_sleep_mode: bool = True, enforce_eager: bool = False):
        if tensor_parallel_size > 1:  # vLLM's Ray workers take the bundles' GPUs themselves
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        from vllm import LLM

        from sparserm.config import ModelConfig, build
        from sparserm.model.backbone import load_tokenizer, resolve_source

        self.model_cfg = build(ModelConfig, model_cfg)
        source, kwargs = resolve_source(self.model_cfg, cache_dir)
        self.tokenizer = load_tokenizer(self.model_cfg, cache_dir)
        self.llm = LLM(model=source, tokenizer=source, revision=kwargs.get("revision"), seed=seed,
                       dtype="bfloat16" if self.model_cfg.dtype == "float32" else self.model_cfg.dtype,
                       tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, enable_lora=True, max_lora_rank=max_lora_rank,
                       enable_sleep_mode=enable_sleep_mode, enforce_eager=enforce_eager,
                       distributed_executor_backend="ray" if tensor_parallel_size > 1 else None)
        self.sleep_mode = enable_sleep_mode
        self.asleep = False
        self.lora = None
        self._n_loaded = 0

    def set_adapter(self, path: str | None) -> str | None:
        from vllm.lora.request import LoRARequest

        if path is None:
            self.lora = None
        elif self.lora is None or self.lora.lora_path != path:
            self._n_loaded += 1
            self.lora = LoRARequest(f"round-adapter-{self._n_loaded}", self._n_loaded, path)
        return path

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)  # level 1 keeps the weights in CPU memory (safe with LoRA)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, conversations: list[list[dict]], sampling: dict, seed: int, batch_size: int = 0) -> list[dict]:
        from vllm import SamplingParams, TokensPrompt

        self.wake_up()
        s = Sampling(**sampling)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in render_prompts(
            self.tokenizer, conversations, s.max_prompt_tokens, self.model_cfg.chat_template)]
        params = [SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=k)
                  for k in request_seeds(seed, len(prompts))]
        outs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        return [{"text": o.outputs[0].text.strip(), "n_tokens": len(o.outputs[0].token_ids),
                 "finished": o.outputs[0].finish_reason == "stop"} for o in outs]

    def placement(self) -> dict:
        from sparserm.align.engines.factory import placement_info

        return placement_info()
