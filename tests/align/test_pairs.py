"""Pair construction with real actors on the tiny model: each task's labeller, one engine call per round."""
import dataclasses

import pytest
import ray

from sparserm.align.labellers import LabelContext, PromptItem
from sparserm.align.pairs import make_pairs


def test_rule_labelled_and_ranked_pairs(tiny_align_config, tiny_model_dir, ray_session, tmp_path):
    from sparserm.align.engines.factory import make_actors
    from sparserm.testing import build_tiny_rm

    rm = build_tiny_rm(tmp_path / "rm", model_dir=tiny_model_dir)
    cfg = tiny_align_config("align.generate.max_new_tokens=6", "align.generate.n_samples=3",
                            "align.generate.temperature=1.0")
    actors = make_actors(cfg, str(rm))
    try:
        _check_pairs(actors, cfg)
    finally:
        actors.close()  # their CPUs are free for the next test at once


def _check_pairs(actors, cfg):
    assert actors.pool.kind == "hf" and actors.judge is None  # no GPU here; no task uses the judge
    items = [PromptItem("truthfulqa", "What is the capital of France?", ["Paris"], ["Lyon"]),
             PromptItem("harmless", "How do I bake bread?")]
    ctx = LabelContext(actors.scorer, actors.judge)

    pairs, stats = make_pairs(actors.pool, ctx, items, cfg.align, seed=1)
    assert stats["n_generated"] == 4  # two plain samples (truthfulqa_refs) + two instructed ones (contrastive)
    assert stats["n_pairs"] + sum(stats["dropped"].values()) == 2
    assert {p["task"]: p["label_source"] for p in pairs}.items() <= {"truthfulqa": "rouge", "harmless": "instruction"}.items()

    ranked = dataclasses.replace(cfg.align, generate=dataclasses.replace(
        cfg.align.generate, labellers=dataclasses.replace(cfg.align.generate.labellers, truthfulqa="ranked",
                                                          harmless="ranked")), filters=("none",))
    pairs, stats = make_pairs(actors.pool, ctx, items, ranked, seed=1)
    assert stats["n_generated"] == 6
    for p in pairs:  # chosen is the RM's best sample, rejected its worst
        s_w, s_l = ray.get(actors.scorer.score.remote([p["prompt"]] * 2, [p["chosen"], p["rejected"]]))
        assert s_w >= s_l
        # the pair carries the scores it was ranked by, so the filter needs no second RM pass
        assert p["score_chosen"] == pytest.approx(s_w, abs=1e-5) and p["score_rejected"] == pytest.approx(s_l, abs=1e-5)


def test_sampling_comes_from_the_generate_config_only():
    from dataclasses import replace

    from sparserm.align.engines.base import Sampling
    from sparserm.align.pairs import sampling_of
    from sparserm.config import AlignConfig, GenerateConfig

    g = replace(GenerateConfig(), max_new_tokens=7, temperature=0.3, top_p=0.5, max_prompt_tokens=11)
    assert sampling_of(replace(AlignConfig(), generate=g)) == {"max_new_tokens": 7, "temperature": 0.3,
                                                               "top_p": 0.5, "max_prompt_tokens": 11}
    with pytest.raises(TypeError):
        Sampling()  # no second set of defaults
