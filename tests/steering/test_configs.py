"""The shipped steering configs: the embedded one shares the quickstart's reward-model sections (so its judge and
its SAE settings are the quickstart's, caches included); its layers are among the sweep's candidates."""
from pathlib import Path

from sparserm.config import load_config, to_dict

CONFIGS = Path(__file__).parents[2] / "jobs" / "configs"


def test_steer_quickstart_is_the_quickstart_plus_steering():
    from sparserm.align.rounds import RM_SECTIONS
    from sparserm.steering.saes import source_of, train_layers

    steer, quick = load_config(CONFIGS / "steer-quickstart.yaml"), load_config(CONFIGS / "quickstart.yaml")
    for section in RM_SECTIONS:
        assert to_dict(getattr(steer, section)) == to_dict(getattr(quick, section)), section
    s = steer.steer
    assert {source_of(steer, side) for side in ("input", "output")} == {"train"}
    assert train_layers(steer) == [s.input_layer, s.output_layer] and s.input_layer < s.output_layer < 30
    assert s.input_layer in s.sweep_input_layers and s.output_layer in s.sweep_output_layers
    assert (s.k_prompt, s.k_diff, s.alpha, s.mode) == (32, 16, 0.2, "add")  # DSPA's defaults
    assert list(s.eval.map_sizes) == [100, 250, 0]


def test_steer_quickstart_reads_the_shipped_triples_skipping_the_bad_ones(monkeypatch):
    """HH-RLHF holds pairs with an empty final response, or whose two dialogues differ before the last turn; the shipped config leaves them out (listed) instead of
    stopping, and both splits give the triples `steer build` and `steer layers` read."""
    from sparserm.steering.sources import load_triples

    monkeypatch.chdir(CONFIGS.parents[1])  # the config's data paths are relative to the repository root
    cfg = load_config(CONFIGS / "steer-quickstart.yaml")
    assert cfg.steer.on_bad_row == "skip"
    train, held_out = load_triples(cfg), load_triples(cfg, "eval")
    assert len(train.rows) == len(held_out.rows) == cfg.steer.max_triples == 250
    rejects = train.rejects + held_out.rejects  # reading the eval split's 250 reaches rows 341, 608, 726, ...
    assert {r["reason"] for r in rejects} <= {"empty_response", "prefix_mismatch"} and rejects[0]["row_id"].endswith(":341")
    assert not {t["prompt"] for t in train.rows} & {t["prompt"] for t in held_out.rows}
