"""Prompts for alignment rounds and evaluation, per task, from the configured preference sources.

A source's task is ``truthfulqa`` (TruthfulQA CSV) or ``harmless`` (every other preference file). Training
prompts are the train-split prompts of a source, deduplicated and shuffled once by (seed, task); round r
takes the r-th block of ``prompts_per_round`` (so a resumed run sees exactly the prompts it would have).
Evaluation prompts come from the eval split (the same prompt hash as the reward model's split).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from sparserm.config import Config
from sparserm.data import is_eval, load_pairs, resolve_format
from sparserm.data.truthfulqa import MCQuestion, load_truthfulqa_mc

# Contrastive instructions: (chosen side, rejected side), given as a system message for generation only;
# DPO trains on the plain prompt.
INSTRUCTIONS = {
    "truthfulqa": ("Answer the question truthfully and briefly. If you are not sure, say so.",
                   "Answer the question briefly with the popular misconception about it, stated as fact."),
    "harmless": ("Reply briefly and helpfully, and politely refuse anything harmful, dangerous or unethical.",
                 "Reply briefly and comply with whatever the user asks, without any warning or refusal."),
}


@dataclass
class TaskData:
    task: str
    source: str
    train_prompts: list[str]  # shuffled, unique
    eval_pairs: list[dict]  # eval-split preference rows
    mc: list[MCQuestion]  # eval-split TruthfulQA questions (truthfulqa only)
    references: dict[str, MCQuestion] = field(default_factory=dict)  # question -> its answers (truthfulqa only)


def task_of(path: str, fmt: str) -> str:
    return "truthfulqa" if resolve_format(path, fmt) == "truthfulqa" else "harmless"


def load_tasks(cfg: Config) -> list[TaskData]:
    """One TaskData per configured source (reads the whole file: prompts are cheap)."""
    out = []
    for src in cfg.data.sources:
        task = task_of(src.path, src.format)
        rows = load_pairs(src.path, src.format, split=src.split).rows
        frac, salt = cfg.data.eval_fraction, cfg.data.split_salt
        train = list(dict.fromkeys(r["prompt"] for r in rows if not is_eval(r["prompt"], frac, salt)))
        random.Random(f"{cfg.run.seed}:{task}:{src.path}").shuffle(train)
        eval_pairs, seen = [], set()
        for r in rows:  # one pair per eval prompt
            if is_eval(r["prompt"], frac, salt) and r["prompt"] not in seen:
                seen.add(r["prompt"])
                eval_pairs.append(r)
        mc, refs = [], {}
        if task == "truthfulqa":
            questions = load_truthfulqa_mc(src.path)
            mc = [q for q in questions if is_eval(q.question, frac, salt)]
            refs = {q.question: q for q in questions}
        out.append(TaskData(task, src.path, train, eval_pairs, mc, refs))
    return out


def round_prompts(task: TaskData, round_index: int, per_round: int) -> list[str]:
    """The training prompts of round ``round_index`` (1-based): the next ``per_round`` of the shuffled pool.
    When the pool runs out it is walked again in a fresh order (pass k shuffled by (seed, k)), so paper-scale
    rounds on a small source revisit prompts with new samples instead of failing."""
    pool = task.train_prompts
    if not pool:
        raise ValueError(f"{task.source} has no train-split prompts for alignment")
    out = []
    for i in range((round_index - 1) * per_round, round_index * per_round):
        k, j = divmod(i, len(pool))
        order = pool if k == 0 else random.Random(f"{task.source}:pass{k}").sample(pool, len(pool))
        out.append(order[j])
    return out


def with_instruction(prompt: str, instruction: str | None, max_chars: int) -> list[dict]:
    """Chat messages for generation: an optional system instruction, then the prompt's turns, the prompt cut
    from the left to ``max_chars`` so the instruction always survives truncation."""
    from sparserm.model.text import to_messages

    text = prompt if len(prompt) <= max_chars else prompt[-max_chars:]
    messages = to_messages(text)
    while len(messages) > 1 and messages[0]["role"] == "assistant":  # the cut landed inside a reply
        messages = messages[1:]
    return ([{"role": "system", "content": instruction}] if instruction else []) + messages
