import pytest

from sparserm.config import Config, ConfigError, DataSource, load_config, to_dict

CONFIGS = ["quickstart", "gemma-2-2b-it", "gemma-2-9b-it", "llama-3.1-8b-instruct"]


def test_defaults_validate_and_round_trip():
    cfg = load_config()
    assert cfg == Config().validate()
    assert cfg.model.layers == (15,)
    assert isinstance(cfg.data.sources[0], DataSource)
    assert to_dict(cfg)["reward"]["top_k"] == 128


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  layer: 9\n  extra_layers: [3, 6]\nreward:\n  loss: bt\n")
    cfg = load_config(path, ["reward.top_k=16", "model.pooling=mean", "run.ray_address=null",
                             "data.sources=[{path: a.jsonl, max_pairs: 5}]"])
    assert cfg.model.layer == 9 and cfg.model.layers == (3, 6, 9)
    assert cfg.reward.loss == "bt" and cfg.reward.top_k == 16 and cfg.model.pooling == "mean"
    assert cfg.data.sources == (DataSource(path="a.jsonl", max_pairs=5),)
    assert cfg.features.batch_size == Config().features.batch_size  # untouched defaults stay


@pytest.mark.parametrize("override, needle", [
    ("reward.topk=3", "reward.topk"),
    ("nosuch.key=1", "nosuch.key"),
    ("model.layer=abc", "model.layer"),
    ("reward.lr=true", "reward.lr"),
    ("model.pooling=max", "model.pooling"),
    ("model.layer.x=1", "model.layer.x"),
    ("reward.loss", "reward.loss"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sae:\n  widht: 100\n")
    with pytest.raises(ConfigError, match="sae.widht"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load(name):
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml")
    if name != "quickstart":
        assert cfg.sae.source == "registry" and cfg.sae.release and cfg.sae.sae_id
