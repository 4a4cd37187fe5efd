"""Candidate pairs from the current policy: each task's labeller says what to generate for a prompt, one
engine call generates for every prompt of the round, and the labeller labels what came back
(:mod:`sparserm.align.labellers`). Dropped pairs are counted by reason."""
from __future__ import annotations

from collections import Counter

from sparserm.progress import progress_bar

from sparserm.align.engines.base import Sampling
from sparserm.align.labellers import LabelContext, PromptItem, get_labeller
from sparserm.config import AlignConfig


def sampling_of(a: AlignConfig) -> dict:
    return Sampling.of(a.generate).to_dict()


def labeller_of(a: AlignConfig, task: str):
    return get_labeller(getattr(a.generate.labellers, task))


def make_pairs(pool, ctx: LabelContext, items: list[PromptItem], a: AlignConfig, seed: int,
               label: str = "") -> tuple[list[dict], dict]:
    """Returns pairs ``{prompt, chosen, rejected, task, label_source, ...}`` and the generation counts; with a
    ``label``, a progress bar of that name counts the generations done."""
    g = a.generate
    max_chars = 4 * g.max_prompt_tokens  # a cheap cut before tokenizing; engines clip to the token budget
    convs, spans = [], []
    for item in items:
        c = labeller_of(a, item.task).conversations(item, g.n_samples, max_chars)
        spans.append((len(convs), len(convs) + len(c)))
        convs += c
    with progress_bar(total=len(convs), desc=label, unit="sample", disable=not label) as bar:
        gens = pool.generate(convs, sampling_of(a), seed, g.batch_size, bar)
    texts = [[gens[i]["text"] for i in range(s, e)] for s, e in spans]
    labelled: list = [None] * len(items)
    for task in dict.fromkeys(i.task for i in items):  # one batched label call per task
        idx = [k for k, it in enumerate(items) if it.task == task]
        for k, res in zip(idx, labeller_of(a, task).label([items[k] for k in idx], [texts[k] for k in idx], ctx)):
            labelled[k] = res
    pairs = [p for p, _ in labelled if p is not None]
    dropped = Counter(why for p, why in labelled if p is None)
    stats = {"n_prompts": len(items), "n_generated": len(gens), "generated_tokens": sum(x["n_tokens"] for x in gens),
             "n_pairs": len(pairs), "dropped": dict(sorted(dropped.items())),
             "per_task": {t: {"n_prompts": sum(i.task == t for i in items), "n_pairs": sum(p["task"] == t for p in pairs)}
                          for t in dict.fromkeys(i.task for i in items)}}
    return pairs, stats
