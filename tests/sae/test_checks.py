"""The SAE is checked against the config before the features pass and at load: reward.top_k against its width,
its layer against model.layer, its d_in against the model's hidden size; each mismatch named by its fields."""
import json

import pytest
import torch

from sparserm.config import Config, ConfigError, DataConfig, DataSource, ModelConfig, RewardConfig, RunConfig, SAEConfig
from sparserm.sae import SAELoadError, train_sae
from sparserm.sae.checks import SAEShape, check_sae, layer_of_hook, model_hidden_size, preflight, read_shape, shape_of

GEMMA = dict(source="registry", release="gemma-scope-2b-pt-res-canonical", sae_id="layer_13/width_16k/canonical")


@pytest.fixture(scope="module")
def local_sae(tmp_path_factory):
    """A tiny SAE trained here on 32-d data, saved for layer 3 (the tiny model's hidden size is 64)."""
    out = tmp_path_factory.mktemp("sae-checks") / "sae"
    sae = train_sae(torch.randn(512, 32), width=64, k=4, batch_size=128, training_tokens=128 * 10, out_dir=out,
                    layer=3, hook_name="tiny:layers.3", progress=False)
    return sae, out


def _cfg(tmp_path, model_dir, sae_dir, layer=3, top_k=8):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) for i in range(4)))
    return Config(run=RunConfig(cache_dir=str(tmp_path / "cache")), data=DataConfig(sources=(DataSource(str(data)),)),
                  model=ModelConfig(name=str(model_dir), layer=layer, max_tokens=32),
                  sae=SAEConfig(source="local", path=str(sae_dir)), reward=RewardConfig(top_k=top_k)).validate()


@pytest.mark.parametrize("hook, layer", [("blocks.13.hook_resid_post", 13), ("blocks.13.hook_resid_pre", 12),
                                         ("/models/blocks.2.x:layers.7", 7), ("hook_embed", None), (None, None)])
def test_layer_of_hook(hook, layer):
    assert layer_of_hook(hook) == layer


def test_local_sae_against_the_config(local_sae, tiny_model_dir, tmp_path):
    sae, out = local_sae
    shape = read_shape(SAEConfig(source="local", path=str(out)))
    assert shape == SAEShape(d_in=32, d_sae=64, layer=3, hook_name="tiny:layers.3")
    assert (shape_of(sae).d_in, shape_of(sae).d_sae, shape_of(sae).layer) == (32, 64, 3)  # as loaded
    cfg = _cfg(tmp_path, tiny_model_dir, out)
    assert model_hidden_size(cfg) == 64
    check_sae(cfg, shape, 32)  # fits
    with pytest.raises(ConfigError, match=r"reward\.top_k=33 is too large for the SAE at sae\.path=.*d_sae=64 "
                                          r"\(reward\.top_k <= 32\)"):
        check_sae(_cfg(tmp_path, tiny_model_dir, out, top_k=33), shape, 32)
    with pytest.raises(ConfigError, match=r"model\.layer=2 does not match the SAE at sae\.path=.*reads layer 3 "
                                          r"\(hook tiny:layers\.3\); set model\.layer=3"):
        check_sae(_cfg(tmp_path, tiny_model_dir, out, layer=2), shape, 32)
    with pytest.raises(ConfigError, match=r"has d_in=32, but model\.name=.* has hidden size 64"):
        preflight(cfg)  # the tiny model's config.json: hidden size 64
    with pytest.raises(SAELoadError, match=r"sae\.path=.*no cfg\.json"):
        read_shape(SAEConfig(source="local", path=str(tmp_path)))


def test_features_pass_and_sae_load_refuse_a_mismatched_sae(local_sae, tiny_model_dir, tmp_path):
    from sparserm.features.stage import run_features
    from sparserm.sae.stage import obtain_sae

    _, out = local_sae
    cfg = _cfg(tmp_path, tiny_model_dir, out, layer=2)
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=r"model\.layer=2 does not match"):
        run_features(cfg, tmp_path / "run")  # before Ray and the model pass
    assert not list((tmp_path / "cache").rglob("*.parquet"))
    with pytest.raises(ConfigError, match=r"d_in=32, but .* hidden size 64"):
        obtain_sae(_cfg(tmp_path, tiny_model_dir, out), None, 3, 64)


def test_registry_sae_read_without_weights():
    from tests.conftest import ROOT
    from sparserm.config import load_config

    shape = read_shape(SAEConfig(**GEMMA))  # GemmaScope's config is computed from the id: no download
    assert shape == SAEShape(d_in=2304, d_sae=16384, layer=13, hook_name="blocks.13.hook_resid_post")
    shipped = load_config(ROOT / "jobs" / "configs" / "gemma-2-2b-it.yaml")
    check_sae(shipped, shape, 2304)
    with pytest.raises(ConfigError, match=r"model\.layer=12 does not match the SAE sae\.release="):
        check_sae(load_config(ROOT / "jobs" / "configs" / "gemma-2-2b-it.yaml", ["model.layer=12"]), shape, 2304)
    with pytest.raises(ConfigError, match=r"reward\.top_k=8193"):
        check_sae(load_config(ROOT / "jobs" / "configs" / "gemma-2-2b-it.yaml", ["reward.top_k=8193"]), shape, 2304)
    with pytest.raises(SAELoadError, match="layer_99"):
        read_shape(SAEConfig(**{**GEMMA, "sae_id": "layer_99/width_16k/canonical"}))
