"""The vLLM engine (GPU): the base model loaded once per engine, each round's LoRA adapter handed over as a
``LoRARequest`` (no weight broadcast). Created by :mod:`sparserm.align.engines.factory` inside a placement
group bundle per tensor-parallel rank."""
from __future__ import annotations

from sparserm.align.engines.base import Sampling, clip_left, render


class VLLMEngine:
    def __init__(self, model_cfg: dict, cache_dir: str, *, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, max_model_len: int = 2048, max_lora_rank: int = 16,
                 seed: int = 0):
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
                       distributed_executor_backend="ray" if tensor_parallel_size > 1 else None)
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

    def generate(self, conversations: list[list[dict]], sampling: dict, seed: int, batch_size: int = 0) -> list[dict]:
        from vllm import SamplingParams, TokensPrompt

        s = Sampling(**sampling)
        prompts = [TokensPrompt(prompt_token_ids=clip_left(render(self.tokenizer, c, self.model_cfg.chat_template),
                                                           s.max_prompt_tokens)) for c in conversations]
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=seed)
        outs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        return [{"text": o.outputs[0].text.strip(), "n_tokens": len(o.outputs[0].token_ids),
                 "finished": o.outputs[0].finish_reason == "stop"} for o in outs]
