"""Where the two SAEs come from (sparserm.steering.saes): trained here from one features pass (both layers' token
samples from the same forward), or a registry release passed through to sae-lens; and the layer sweep on the
same pass."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparserm.steering.build import build_map
from sparserm.steering.store import load_map

TRAIN = ["steer.input_sae_dir=null", "steer.output_sae_dir=null", "steer.input_layer=1", "steer.output_layer=2",
         "sae.width=64", "sae.k=4", "sae.batch_size=32", "sae.training_tokens=3200", "reward.top_k=8",
         "features.batch_size=8", "features.token_sample_rate=1.0", "features.num_cpus=1"]


@pytest.fixture(scope="module")
def passes(monkeypatch_module):
    """Counts the features passes (extraction executions) made in this module."""
    import sparserm.features.extract as extract

    calls = []
    real = extract.extract_to_shards
    monkeypatch_module.setattr(extract, "extract_to_shards", lambda rows, *a, **k: calls.append(len(rows)) or
                               real(rows, *a, **k))
    return calls


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def trained(steer_config, triples_file, tmp_path_factory, passes, ray_session):
    cfg = steer_config(*TRAIN, f"data.sources=[{{path: '{triples_file}'}}]")
    out = build_map(cfg, tmp_path_factory.mktemp("steer-trained") / "map", progress=False)
    return cfg, out


def test_build_trains_both_saes_from_one_features_pass(trained, passes):
    from sparserm.features.cache import ActivationCache
    from sparserm.manifest import folder_hash
    from sparserm.sae.stage import trained_sae_dir
    from sparserm.testing import tensorboard_scalars
    from sparserm.steering.flops import sae_training_flops
    from sparserm.steering.saes import pass_config

    cfg, out = trained
    smap = load_map(out)
    assert (smap.input.layer, smap.output.layer) == (1, 2) and smap.input.d_sae == smap.output.d_sae == 64
    assert len(passes) == 1  # one extraction for both SAEs
    sources = {json.loads((p / "evaluation_source.json").read_text())["activation_cache"]
               for p in (Path(smap.input.folder), Path(smap.output.folder))}
    assert len(sources) == 1  # both trained from the same activation cache
    cache = ActivationCache(sources.pop())
    assert cache.summary["layers"] == [1, 2]
    for side in (smap.input, smap.output):  # exactly the folders `rm train` would use for that layer (in the map)
        assert folder_hash(side.folder) == folder_hash(trained_sae_dir(pass_config(cfg, [1, 2]), cache, side.layer))
        assert Path(side.folder) == (out / "saes" / side.side).resolve()
        meta = json.loads((Path(side.folder) / "sparserm_sae.json").read_text())
        # tracked as rm train's SAE is: its held-out quality (the folder's eval.json) at the SAE's step count (and
        # its training steps before, when this build trained it: the session's cache may hold it already)
        tb = tensorboard_scalars(out / "sae_pass" / "tensorboard" / f"sae-layer{side.layer}")
        quality = json.loads((Path(side.folder) / "eval.json").read_text())
        floats = {k: v for k, v in quality.items() if isinstance(v, float)}
        assert floats and {k: tb[f"eval/{k}"][-1] for k in floats} == {k: (meta["steps"], np.float32(v))
                                                                        for k, v in floats.items()}
        assert len(tb.get("losses/overall_loss", [])) in (0, meta["steps"])
        assert meta["layer"] == side.layer and meta["source"] == "train"
        # what `steer evaluate` counts for it: fwd + bwd (3x) of encode and decode (2 d m each) a training token
        assert sae_training_flops(side.d_in, side.d_sae, meta["steps"] * meta["batch_size"]) == 3 * 4 * 64 * 64 * 3200
    assert build_map(cfg, out, progress=False) == out and len(passes) == 1  # cached: no pass, no training


def test_layer_sweep_reads_the_same_pass_and_reproduces_the_build(trained, passes, tmp_path):
    from sparserm.config import replace
    from sparserm.steering.layers import run_layer_sweep

    cfg, out = trained
    sweep = replace(cfg, steer=replace(cfg.steer, sweep_input_layers=(1,), sweep_output_layers=(2,)))
    md = run_layer_sweep(sweep, tmp_path)
    report = json.loads((tmp_path / "layers.json").read_text())
    assert len(passes) == 1  # the layers {1, 2} were extracted already
    (row,) = report["rows"]
    smap = load_map(out)
    quality = json.loads((Path(smap.output.folder) / "eval.json").read_text())
    assert row["explained_out"] == pytest.approx(1 - quality["fvu"])
    assert row["mass"] == pytest.approx(float(smap.cmap.values.abs().sum()), rel=1e-5)  # the build's own map
    assert row["nnz"] == smap.cmap.nnz and 0 <= row["heldout_agreement"] <= 1 and row["n_compared"] > 0
    assert report["chosen"] == {"input_layer": 1, "output_layer": 2} and "**(chosen)**" in md.read_text()


def test_agreement_and_choice_by_hand():
    from sparserm.steering.conditional_map import ConditionalMap
    from sparserm.steering.layers import choose, agreement
    from sparserm.steering.vector import SteerSettings

    cmap = ConditionalMap.from_dense(torch.tensor([[0.5, -0.2, 0.0], [0.0, 0.3, 0.1]]))
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # prompt 1 gates latent 0: s = [.5, -.2, 0]; prompt 2: [0, .3, .1]
    D = torch.tensor([[0.4, 0.1, 0.9], [0.0, 0.2, -0.1]])
    # prompt 1: latents 0 (+ vs +: same), 1 (- vs +: not); prompt 2: latents 1 (same), 2 (+ vs -: not); 0 skipped
    assert agreement(G, D, cmap, SteerSettings(alpha=0.2, mode="add", k_prompt=1, k_diff=3)) == (0.5, 4)
    rows = [{"explained_in": 0.9, "explained_out": 0.5, "heldout_agreement": 0.9, "mass": 1.0},
            {"explained_in": 0.9, "explained_out": 0.7, "heldout_agreement": 0.6, "mass": 0.1},
            {"explained_in": 0.8, "explained_out": 0.8, "heldout_agreement": 0.6, "mass": 0.3}]
    assert choose(rows) is rows[2]  # the first explains too little; the tie goes to the larger mass
    # a pair with nothing compared (an empty map) ranks last, ahead or not; among such pairs mass decides
    unmeasured = {"explained_in": 0.9, "explained_out": 0.9, "heldout_agreement": float("nan"), "mass": 5.0}
    assert choose([unmeasured, *rows]) is rows[2] and choose([*rows, unmeasured]) is rows[2]
    assert choose([unmeasured, {**unmeasured, "mass": 6.0}])["mass"] == 6.0


def test_registry_release_is_passed_through_to_sae_lens_and_linked_in_the_audit(steer_config, tiny_saes,
                                                                                 tmp_path, monkeypatch, ray_session):
    """sae-lens' download stands in for a local SAE folder here (no network); everything after it is real."""
    from sae_lens import SAE

    from sparserm.steering.audit import write_audit

    calls = []

    def from_pretrained(release, sae_id, device="cpu"):
        calls.append((release, sae_id))
        return SAE.load_from_disk(str(tiny_saes[1]), device=device)

    monkeypatch.setattr(SAE, "from_pretrained", staticmethod(from_pretrained))
    release, sae_id = "gemma-scope-2b-pt-res-canonical", "layer_24/width_16k/canonical"
    cfg = steer_config("steer.output_sae_dir=null", f"steer.output_sae_registry={{release: {release}, "
                       f"sae_id: '{sae_id}'}}", "steer.output_layer=2", f"run.cache_dir={tmp_path / 'cache'}")
    out = build_map(cfg, tmp_path / "map", progress=False)
    assert build_map(cfg, out, progress=False) == out
    assert calls == [(release, sae_id)]  # fetched once, then the cached folder
    smap = load_map(out)
    meta = json.loads((Path(smap.output.folder) / "sparserm_sae.json").read_text())
    assert (meta["release"], meta["sae_id"], meta["source"]) == (release, sae_id, "registry")
    assert meta["neuronpedia_id"] == "gemma-2-2b/24-gemmascope-res-16k"  # from sae-lens' registry entry
    write_audit(out)
    audit = json.loads((out / "audit.json").read_text())
    assert audit["latents"] and all(x["neuronpedia"] == f"https://www.neuronpedia.org/gemma-2-2b/"
                                    f"24-gemmascope-res-16k/{x['latent']}" for x in audit["latents"])
    assert "[Neuronpedia](https://www.neuronpedia.org/gemma-2-2b/24-gemmascope-res-16k/" in \
        (out / "audit.md").read_text()


def test_a_trained_side_needs_its_layer(steer_config, tmp_path):
    from sparserm.config import ConfigError

    with pytest.raises(ConfigError, match=r"steer\.input_layer=None .* trained here"):
        build_map(steer_config("steer.input_sae_dir=null"), tmp_path / "map", progress=False)


def test_the_hub_configs_registry_saes_reach_sae_lens(tiny_saes, tmp_path, monkeypatch):
    from sae_lens import SAE

    from sparserm.config import load_config
    from sparserm.steering.saes import sae_folder, source_of

    calls = []
    monkeypatch.setattr(SAE, "from_pretrained", staticmethod(
        lambda release, sae_id, device="cpu": calls.append((release, sae_id)) or SAE.load_from_disk(str(tiny_saes[0]))))
    cfg = load_config(Path(__file__).parents[2] / "jobs" / "configs" / "steer-gemma-2-2b-it.yaml",
                      [f"run.cache_dir={tmp_path}"])
    folders = {side: sae_folder(cfg, side, tmp_path / "work") for side in ("input", "output")}
    assert {source_of(cfg, s) for s in folders} == {"registry"}
    assert calls == [("gemma-scope-2b-pt-res-canonical", "layer_7/width_16k/canonical"),
                     ("gemma-scope-2b-pt-res-canonical", "layer_24/width_16k/canonical")]
    ids = {json.loads(Path(f, "sparserm_sae.json").read_text())["neuronpedia_id"] for f in folders.values()}
    assert ids == {"gemma-2-2b/7-gemmascope-res-16k", "gemma-2-2b/24-gemmascope-res-16k"}
