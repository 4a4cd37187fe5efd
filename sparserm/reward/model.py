"""The SparseRM artifact and its scoring API.

A reward-model folder holds ``rm.json`` (backbone, layer, pooling, token budget, SAE identity, selected
latents), ``directions.safetensors`` (the 2K decoder rows and the frequency statistics) and ``head/``
(the MLP head). Scoring needs the backbone up to the layer and the directions; not the SAE itself.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sparserm.config import ModelConfig, build
from sparserm.reward.directions import project
from sparserm.reward.head import RewardHead, load_head, save_head

RM_FORMAT = "sparserm-rm/1"


def save_rm(out: Path, *, model_cfg: ModelConfig, head: RewardHead, dirs: torch.Tensor, pos_ids, neg_ids,
            mu_w, mu_l, sae_info: dict, extra: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_file({"directions": dirs.contiguous().float(), "pos_ids": torch.as_tensor(pos_ids, dtype=torch.long),
               "neg_ids": torch.as_tensor(neg_ids, dtype=torch.long),
               "mu_w": torch.as_tensor(np.asarray(mu_w), dtype=torch.float32),
               "mu_l": torch.as_tensor(np.asarray(mu_l), dtype=torch.float32)}, str(out / "directions.safetensors"))
    save_head(head, out / "head")
    meta = {"format": RM_FORMAT, "model": asdict(model_cfg), "layer": model_cfg.layer, "pooling": model_cfg.pooling,
            "top_k": len(pos_ids), "sae": sae_info, **(extra or {})}
    (out / "rm.json").write_text(json.dumps(meta, indent=2, default=str))
    return out


class SparseRM:
    """``SparseRM.load(path).score(prompts, responses) -> list[float]``."""

    def __init__(self, path: Path, meta: dict, dirs: torch.Tensor, head: RewardHead, backbone=None):
        self.path, self.meta, self.dirs, self.head = path, meta, dirs, head
        self.model_cfg = build(ModelConfig, {**meta["model"], "extra_layers": []})
        self._backbone = backbone

    @classmethod
    def load(cls, path: str | Path, backbone=None) -> "SparseRM":
        """From a SparseRM folder: a local path or a storage URI (pulled into this node's mirror first)."""
        from sparserm.storage import fetched

        path = fetched(path)
        if not (path / "rm.json").is_file():
            raise FileNotFoundError(f"{path} is not a SparseRM folder (no rm.json)")
        meta = json.loads((path / "rm.json").read_text())
        if meta.get("format") != RM_FORMAT:
            raise ValueError(f"{path}/rm.json: unknown format {meta.get('format')!r}, expected {RM_FORMAT}")
        tensors = load_file(str(path / "directions.safetensors"))
        return cls(path, meta, tensors["directions"], load_head(path / "head").eval(), backbone)

    @property
    def backbone(self):
        if self._backbone is None:
            from sparserm.config import default_cache_dir
            from sparserm.model.backbone import load_backbone

            self._backbone = load_backbone(self.model_cfg, default_cache_dir())
        return self._backbone

    @torch.no_grad()
    def score_states(self, h: torch.Tensor) -> torch.Tensor:
        """Scores from pooled layer-L states [N, d]."""
        return self.head(project(h.float(), self.dirs.to(h.device))).float()

    @torch.no_grad()
    def pooled_groups(self, groups: list, max_batch_tokens: int = 4096) -> list[torch.Tensor]:
        """Pooled states [n_responses, d] of token groups, from packed forwards within the token budget."""
        from sparserm.model.forward import packed_states

        cfg = self.model_cfg
        return [torch.stack([t.pooled(cfg.layer, cfg.pooling) for t in texts])
                for texts in packed_states(self.backbone, groups, max_batch_tokens=max_batch_tokens)]

    def pooled_states(self, prompts: list[str], responses: list[list[str]]) -> list[torch.Tensor]:
        """Pooled states for groups: prompt i with its responses (the prompt computed once per group)."""
        from sparserm.model.text import encode_group

        bb, cfg = self.backbone, self.model_cfg
        return self.pooled_groups([encode_group(bb.tokenizer, prompt, list(resp), cfg.max_tokens, cfg.chat_template)
                                   for prompt, resp in zip(prompts, responses)])

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        h = torch.cat(self.pooled_states(prompts, [[r] for r in responses]))
        return self.score_states(h).tolist()

    def score_pairs(self, prompts: list[str], chosen: list[str], rejected: list[str]) -> tuple[list[float], list[float]]:
        h = self.pooled_states(prompts, [[c, r] for c, r in zip(chosen, rejected)])
        s = self.score_states(torch.cat(h)).view(-1, 2)
        return s[:, 0].tolist(), s[:, 1].tolist()
