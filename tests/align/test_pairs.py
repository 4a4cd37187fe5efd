"""Pair construction with real actors on the tiny model: contrastive and ranked (RM best vs worst of n)."""
import pytest
import ray

from sparserm.align.pairs import make_pairs


def test_contrastive_and_ranked_pairs(tiny_align_config, tiny_model_dir, ray_session, tmp_path):
    from sparserm.align.engines.factory import make_actors
    from sparserm.testing import build_tiny_rm

    rm = build_tiny_rm(tmp_path / "rm", model_dir=tiny_model_dir)
    cfg = tiny_align_config("align.max_new_tokens=6", "align.n_samples=3", "align.temperature=1.0")
    pool, _, scorer = make_actors(cfg, str(rm))
    assert pool.kind == "hf"  # no GPU here
    items = [("truthfulqa", "What is the capital of France?"), ("harmless", "How do I bake bread?")]

    pairs, stats = make_pairs(pool, scorer, items, cfg.align, seed=1)
    assert stats["n_generated"] == 4 and stats["n_pairs"] + stats["dropped_empty"] + stats["dropped_identical"] == 2
    assert all(p["task"] in ("truthfulqa", "harmless") and p["chosen"] != p["rejected"] for p in pairs)

    import dataclasses

    ranked = dataclasses.replace(cfg.align, pair_mode="ranked")
    pairs, stats = make_pairs(pool, scorer, items, ranked, seed=1)
    assert stats["n_generated"] == 6
    for p in pairs:  # chosen is the RM's best sample, rejected its worst
        s_w, s_l = ray.get(scorer.score.remote([p["prompt"]] * 2, [p["chosen"], p["rejected"]]))
        assert s_w >= s_l
        # the pair carries the scores it was ranked by, so the filter needs no second RM pass
        assert p["score_chosen"] == pytest.approx(s_w, abs=1e-5) and p["score_rejected"] == pytest.approx(s_l, abs=1e-5)


def test_sampling_comes_from_the_align_config_only():
    from dataclasses import replace

    from sparserm.align.engines.base import Sampling
    from sparserm.align.pairs import sampling_of
    from sparserm.config import AlignConfig

    a = replace(AlignConfig(), max_new_tokens=7, temperature=0.3, top_p=0.5, max_prompt_tokens=11)
    assert sampling_of(a) == {"max_new_tokens": 7, "temperature": 0.3, "top_p": 0.5, "max_prompt_tokens": 11}
    with pytest.raises(TypeError):
        Sampling()  # no second set of defaults
