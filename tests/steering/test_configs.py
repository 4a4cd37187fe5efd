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
