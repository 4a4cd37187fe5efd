"""The RM filter and the evaluation measures on hand-computed examples (losses: test_objectives)."""
import math

import pytest

from sparserm.align.evaluate import mc_items, mc_scores, wins
from sparserm.align.filter import filter_pairs
from sparserm.data.truthfulqa import MCQuestion


def test_filter_keeps_exactly_pairs_where_rm_agrees():
    pairs = [{"prompt": f"p{i}"} for i in range(5)]
    s_w = [1.0, 0.0, -2.0, 0.5, 3.0]
    s_l = [0.0, 0.0, -1.0, 0.7, -3.0]
    kept, stats = filter_pairs([dict(p) for p in pairs], s_w, s_l, "rm")
    assert [p["prompt"] for p in kept] == ["p0", "p1", "p4"]  # ties kept (s_chosen >= s_rejected)
    assert stats["n_kept"] == 3 and stats["n_dropped"] == 2 and stats["rm_agreement"] == pytest.approx(0.6)
    assert kept[0]["score_chosen"] == 1.0 and kept[0]["score_rejected"] == 0.0
    all_kept, stats = filter_pairs([dict(p) for p in pairs], s_w, s_l, "none")
    assert len(all_kept) == 5 and stats["n_dropped"] == 0
    with pytest.raises(ValueError, match="scores"):
        filter_pairs(pairs, s_w[:2], s_l, "rm")
    with pytest.raises(ValueError, match="unknown"):
        filter_pairs(pairs, s_w, s_l, "judge")


def test_mc1_mc2_known_answer():
    # true answers: log-probs log(0.3), log(0.1); false: log(0.4), log(0.2)
    lp_true, lp_false = [math.log(0.3), math.log(0.1)], [math.log(0.4), math.log(0.2)]
    mc1, mc2 = mc_scores(lp_true, lp_false, best=0)
    assert mc1 == 0.0  # the best answer (0.3) loses to a false one (0.4)
    assert mc2 == pytest.approx(0.4 / 1.0)
    mc1, mc2 = mc_scores([math.log(0.5), math.log(0.1)], [math.log(0.4)], best=0)
    assert mc1 == 1.0 and mc2 == pytest.approx(0.6)
    q = MCQuestion("Q?", best_answer="b", correct=["a", "b"], incorrect=["x"])
    assert mc_items([q]) == [("Q?", ["a", "b", "x"], 2, 1)]
    q2 = MCQuestion("Q?", best_answer="c", correct=["a"], incorrect=["x"])
    assert mc_items([q2]) == [("Q?", ["c", "a", "x"], 2, 0)]


def test_win_rate_counts_ties_as_half():
    assert wins([1.0, 2.0, 0.0, 5.0], [0.0, 2.0, 1.0, 1.0]) == [1.0, 0.5, 0.0, 1.0]
    with pytest.raises(ValueError):
        wins([1.0], [])
