"""The one model pass: Ray Data streams preference pairs through actors that hold the truncated backbone.

Per text the actors emit the pooled residual of every configured layer and a seeded sample of per-token
residuals (the SAE's training data). Chosen and rejected share their prompt: it runs once, and several
pairs go through the model in one packed forward (``model.forward.packed_states``).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict

import numpy as np
import torch

from sparserm.config import FeaturesConfig, ModelConfig, build

SIDES = ("chosen", "rejected")


def _row_seed(row_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little")


class ResidualExtractor:
    """Callable class for ``Dataset.map_batches``: one backbone per actor, loaded once."""

    def __init__(self, model_cfg: dict, features_cfg: dict, cache_dir: str, seed: int):
        from sparserm.model.backbone import load_backbone

        self.model_cfg = build(ModelConfig, model_cfg)
        self.cfg = build(FeaturesConfig, features_cfg)
        # Ray sets OMP_NUM_THREADS to the actor's CPU reservation; the model should use what the node has.
        torch.set_num_threads(self.cfg.torch_threads or os.cpu_count() or 1)
        self.backbone = load_backbone(self.model_cfg, cache_dir)
        self.seed = seed

    def _states(self, groups):
        """TextStates of every text of every group: packed forwards within the token budget."""
        from sparserm.model.forward import packed_states

        return packed_states(self.backbone, groups, self.cfg.share_prefix, self.cfg.max_batch_tokens)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sparserm.model.text import encode_group

        out: dict[str, list] = {k: [] for k in ("row_id", "prompt_id", "source", "split", "side", "text",
                                                "n_tokens", "n_computed", "token_ids")}
        layers = self.backbone.layers
        for layer in layers:
            out[f"pooled_{layer}"] = []
            out[f"tokens_{layer}"] = []
        groups = [encode_group(self.backbone.tokenizer, str(p), [str(c), str(r)], self.model_cfg.max_tokens,
                               self.model_cfg.chat_template)
                  for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"])]
        for i, (group, texts) in enumerate(zip(groups, self._states(groups))):
            row_id = str(batch["row_id"][i])
            rng = np.random.default_rng(_row_seed(row_id, self.seed))
            n_prefix = len(group.prefix)
            for side, text in zip(SIDES, texts):
                # Token sample: the shared prompt tokens are sampled once (with the chosen text).
                start = 0 if side == "chosen" else n_prefix
                positions = np.arange(start, len(text.token_ids))
                keep = positions[rng.random(len(positions)) < self.cfg.token_sample_rate]
                out["row_id"].append(row_id)
                out["prompt_id"].append(hashlib.sha256(str(batch["prompt"][i]).encode()).hexdigest()[:16])
                out["source"].append(str(batch["source"][i]))
                out["split"].append(str(batch["split"][i]))
                out["side"].append(side)
                out["text"].append(str(batch[side][i]))
                out["n_tokens"].append(len(text.token_ids))
                out["n_computed"].append(len(text.token_ids) - start if self.cfg.share_prefix else len(text.token_ids))
                out["token_ids"].append(np.asarray([text.token_ids[p] for p in keep], dtype=np.int64))
                for layer in layers:
                    out[f"pooled_{layer}"].append(text.pooled(layer, self.model_cfg.pooling).cpu().numpy())
                    out[f"tokens_{layer}"].append(text.states[layer][torch.as_tensor(keep, dtype=torch.long)]
                                                  .cpu().numpy().astype(np.float32).reshape(-1))
        result = {}
        for k, v in out.items():
            if k.startswith("pooled_"):
                result[k] = np.stack(v).astype(np.float32)
            elif k.startswith("tokens_") or k == "token_ids":
                result[k] = _ragged(v)
            else:
                result[k] = np.asarray(v)
        return result


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    holder = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        holder[i] = a
    return holder


def extract_to_parquet(rows: list[dict], out_dir: str, model_cfg: ModelConfig, features_cfg: FeaturesConfig,
                       cache_dir: str, seed: int) -> None:
    """One Ray Data pass over ``rows`` (dicts with prompt/chosen/rejected/source/row_id/split), writing
    Parquet shards into ``out_dir``. Rows are ordered by length so batches hold texts of similar size."""
    import ray

    ordered = sorted(rows, key=lambda r: len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]))
    ds = ray.data.from_items(ordered, override_num_blocks=max(1, len(ordered) // max(1, features_cfg.batch_size)))
    ds = ds.map_batches(
        ResidualExtractor,
        fn_constructor_kwargs={"model_cfg": asdict(model_cfg), "features_cfg": asdict(features_cfg),
                               "cache_dir": cache_dir, "seed": seed},
        batch_size=features_cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=features_cfg.num_actors),
        num_cpus=features_cfg.num_cpus_per_actor,
        num_gpus=features_cfg.num_gpus_per_actor or None,
    )
    ds.write_parquet(out_dir)
