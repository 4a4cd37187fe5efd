"""Candidate pairs from the current policy (``align.pair_mode``).

- ``contrastive`` (default): two generations per prompt, one under the task's chosen-side instruction and
  one under its rejected-side instruction (``prompts.INSTRUCTIONS``); the label comes from the instruction.
- ``ranked``: ``n_samples`` plain generations per prompt, the RM's best as chosen and its worst as
  rejected (best-of-n vs worst-of-n); these pairs carry the scores they were ranked by, so the filter
  does not score them again.
Pairs with an empty or identical side are dropped and counted.
"""
from __future__ import annotations

import ray

from sparserm.align.engines.base import Sampling
from sparserm.align.prompts import INSTRUCTIONS, with_instruction
from sparserm.config import AlignConfig


def sampling_of(a: AlignConfig) -> dict:
    return Sampling.of(a).to_dict()


def _keep(pair: dict, stats: dict) -> bool:
    if not pair["chosen"] or not pair["rejected"]:
        stats["dropped_empty"] += 1
        return False
    if pair["chosen"] == pair["rejected"]:
        stats["dropped_identical"] += 1
        return False
    return True


def make_pairs(pool, scorer, items: list[tuple[str, str]], a: AlignConfig, seed: int) -> tuple[list[dict], dict]:
    """``items``: (task, prompt). Returns pairs ``{prompt, chosen, rejected, task}`` and generation counts."""
    max_chars = 4 * a.max_prompt_tokens
    stats = {"n_prompts": len(items), "dropped_empty": 0, "dropped_identical": 0, "n_generated": 0,
             "generated_tokens": 0}
    pairs = []
    if a.pair_mode == "contrastive":
        convs = [with_instruction(p, INSTRUCTIONS[t][side], max_chars) for t, p in items for side in (0, 1)]
        gens = pool.generate(convs, sampling_of(a), seed, a.generation_batch_size)
        for k, (task, prompt) in enumerate(items):
            pair = {"prompt": prompt, "chosen": gens[2 * k]["text"], "rejected": gens[2 * k + 1]["text"], "task": task}
            if _keep(pair, stats):
                pairs.append(pair)
    else:
        n = a.n_samples
        convs = [with_instruction(p, None, max_chars) for _, p in items for _ in range(n)]
        gens = pool.generate(convs, sampling_of(a), seed, a.generation_batch_size)
        texts = [g["text"] for g in gens]
        prompts = [p for _, p in items for _ in range(n)]
        scores = ray.get(scorer.score.remote(prompts, texts))
        for k, (task, prompt) in enumerate(items):
            block = list(range(k * n, (k + 1) * n))
            best = max(block, key=lambda i: scores[i])
            worst = min(block, key=lambda i: scores[i])
            pair = {"prompt": prompt, "chosen": texts[best], "rejected": texts[worst], "task": task,
                    "score_chosen": float(scores[best]), "score_rejected": float(scores[worst])}
            if _keep(pair, stats):
                pairs.append(pair)
    stats["n_generated"] = len(gens)
    stats["generated_tokens"] = sum(g["n_tokens"] for g in gens)
    stats["n_pairs"] = len(pairs)
    return pairs, stats
