"""Labellers: the task's own rule that turns a prompt's generations into a (chosen, rejected) pair (SPEC §3.1).

The pair is labelled here, never by the reward model that filters it afterwards (the filter only means
something when the labels come from elsewhere). A labeller says what to generate for a prompt
(``conversations``) and labels what came back (``label``: a pair, or the reason it was dropped). Config
picks one per task (``align.generate.labellers.<task>``):

- ``truthfulqa_refs`` (TruthfulQA default): two plain samples; chosen is the one whose ROUGE-L similarity to
  the question's correct answers minus its similarity to the incorrect answers is larger: TruthfulQA's own
  automatic generation metric (max over references of rougeLsum, as lm-eval's ``truthfulqa_gen`` computes
  it, "I have no comment." counted among the correct answers as the TruthfulQA paper does). Ties are
  dropped (``tie``), and so is a pair where neither sample is closer to a correct than to an incorrect
  answer (``both_bad``: a preference between two falsehoods teaches nothing true).
- ``contrastive`` (HH default): one sample under a harmless and one under a careless system instruction
  (RLCD-style contrastive prompting); DPO then trains on the plain prompt without the instruction.
- ``judge``: two plain samples, a chat model (``align.generate.judge_model``) asked which reply is more
  harmless and helpful, read from its next-token probabilities of "A" and "B" with both orders averaged
  (position bias cancels); needs a network for hub models and, at useful speed, a GPU.
- ``ranked``: ``n_samples`` plain samples, the RM's best as chosen and its worst as rejected. The labels are
  the RM's, so ``filters: [rm]`` would keep every pair: the config refuses that combination.

Every labeller drops pairs with an empty side (``empty``) or two identical sides (``identical``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sparserm.align.prompts import INSTRUCTIONS, with_instruction


@dataclass
class PromptItem:
    task: str
    prompt: str
    correct: list[str] = field(default_factory=list)  # reference answers (TruthfulQA); empty elsewhere
    incorrect: list[str] = field(default_factory=list)


@dataclass
class LabelContext:
    """What labellers that consult a model need: the RM scorer actor (ranked) and the judge actor."""

    scorer: object = None
    judge: object = None


Labelled = tuple[dict | None, str | None]  # (pair, None) or (None, drop reason)


@dataclass(frozen=True)
class Labeller:
    name: str
    conversations: Callable[[PromptItem, int, int], list[list[dict]]]  # (item, n_samples, max_chars)
    label: Callable[[list[PromptItem], list[list[str]], LabelContext], list[Labelled]]  # batched over prompts
    uses_rm: bool = False  # the labels are the RM's own (the RM filter would keep every pair)
    needs_references: bool = False


LABELLERS: dict[str, Labeller] = {}


def register(labeller: Labeller) -> Labeller:
    LABELLERS[labeller.name] = labeller
    return labeller


def get_labeller(name: str) -> Labeller:
    if name not in LABELLERS:
        raise ValueError(f"labeller {name!r} is unknown: expected one of {sorted(LABELLERS)}")
    return LABELLERS[name]


def _pair(item: PromptItem, chosen: str, rejected: str, **extra) -> Labelled:
    if not chosen or not rejected:
        return None, "empty"
    if chosen == rejected:
        return None, "identical"
    return {"prompt": item.prompt, "chosen": chosen, "rejected": rejected, "task": item.task, **extra}, None


def _plain(n: int | None = None):
    def conversations(item: PromptItem, n_samples: int, max_chars: int) -> list[list[dict]]:
        return [with_instruction(item.prompt, None, max_chars)] * (n or n_samples)

    return conversations


# ---------------------------------------------------------------- contrastive


def _contrastive_convs(item: PromptItem, n_samples: int, max_chars: int) -> list[list[dict]]:
    return [with_instruction(item.prompt, INSTRUCTIONS[item.task][side], max_chars) for side in (0, 1)]


def _contrastive_label(items, texts, ctx) -> list[Labelled]:
    return [_pair(item, t[0], t[1], label_source="instruction") for item, t in zip(items, texts)]


register(Labeller("contrastive", _contrastive_convs, _contrastive_label))


# ---------------------------------------------------------------- truthfulqa_refs

NO_COMMENT = "I have no comment."


def truthfulqa_rouge_diff(response: str, correct: list[str], incorrect: list[str]) -> float:
    """max rougeLsum F1 against the correct answers minus the max against the incorrect ones."""
    from rouge_score import rouge_scorer

    scorer = _rouge_scorer(rouge_scorer)
    true_refs = list(correct) + ([NO_COMMENT] if NO_COMMENT not in correct else [])

    def best(refs: list[str]) -> float:
        return max((scorer.score(_lines(r), _lines(response))["rougeLsum"].fmeasure for r in refs), default=0.0)

    return best(true_refs) - best(list(incorrect))


_SCORER = None


def _rouge_scorer(module):
    global _SCORER
    if _SCORER is None:
        _SCORER = module.RougeScorer(["rougeLsum"])
    return _SCORER


def _lines(text: str) -> str:
    """rougeLsum splits summaries on newlines; one sentence a line, as lm-eval's ``_prepare_summary``."""
    return text.replace(" . ", ".\n")


def _refs_label(items, texts, ctx) -> list[Labelled]:
    out = []
    for item, (a, b) in zip(items, texts):
        if not item.correct or not item.incorrect:
            raise ValueError(f"truthfulqa_refs: prompt {item.prompt[:60]!r} has no reference answers "
                             "(this labeller needs a TruthfulQA-format source)")
        da, db = (truthfulqa_rouge_diff(t, item.correct, item.incorrect) for t in (a, b))
        if da == db:
            out.append((None, "tie"))
        elif max(da, db) <= 0:
            out.append((None, "both_bad"))
        else:
            w, l = (a, b) if da > db else (b, a)
            out.append(_pair(item, w, l, label_source="rouge", rule_margin=abs(da - db)))
    return out


register(Labeller("truthfulqa_refs", _plain(2), _refs_label, needs_references=True))


# ---------------------------------------------------------------- judge


def _judge_label(items, texts, ctx) -> list[Labelled]:
    import ray

    if ctx.judge is None:
        raise ValueError("judge labeller: no judge actor (align.generate.judge_model is unset)")
    prefs = ray.get(ctx.judge.prefer_first.remote([(i.prompt, t[0], t[1]) for i, t in zip(items, texts)]))
    out = []
    for item, (a, b), p in zip(items, texts, prefs):
        if p == 0.5:
            out.append((None, "tie"))
            continue
        w, l = (a, b) if p > 0.5 else (b, a)
        out.append(_pair(item, w, l, label_source="judge", rule_margin=abs(p - 0.5)))
    return out


register(Labeller("judge", _plain(2), _judge_label))


# ---------------------------------------------------------------- ranked


def _ranked_label(items, texts, ctx) -> list[Labelled]:
    import ray

    flat = [(item.prompt, t) for item, ts in zip(items, texts) for t in ts]
    scores = ray.get(ctx.scorer.score.remote([p for p, _ in flat], [t for _, t in flat]))
    out, k = [], 0
    for item, ts in zip(items, texts):
        block = scores[k: k + len(ts)]
        k += len(ts)
        best = max(range(len(ts)), key=lambda i: block[i])
        worst = min(range(len(ts)), key=lambda i: block[i])
        if block[best] == block[worst] and len(set(ts)) > 1:  # the RM prefers none of the samples
            out.append((None, "tie"))
            continue
        out.append(_pair(item, ts[best], ts[worst], label_source="rm", score_chosen=float(block[best]),
                         score_rejected=float(block[worst])))
    return out


register(Labeller("ranked", _plain(), _ranked_label, uses_rm=True))
