"""The offline FPO reference cache: one Ray Data pass equals the in-process pair_forward, and keys guard it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparserm.config import load_config
from sparserm.fpo.reference_cache import (build_reference_cache, cache_key, forward_batches, load_reference_cache)
from sparserm.manifest import StaleArtifactError
from sparserm.testing import build_tiny_sae

LAYER = 2
PAIRS = [{"prompt": "How do I bake bread" + "?" * i,
          "chosen": "Mix flour, water and yeast, then bake it." * (1 + i % 3), "rejected": "I won't help" + " with that" * i + "."} for i in range(7)]


@pytest.fixture(scope="module")
def cfg(tiny_model_dir, cache_dir):
    return load_config(None, [f"model.name={tiny_model_dir}", f"run.cache_dir={cache_dir}",
                              "align.generate.max_new_tokens=16", "align.generate.max_prompt_tokens=24",
                              "align.reference_cache.batch_size=3", "align.reference_cache.num_cpus=1"])


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    return str(build_tiny_sae(tmp_path_factory.mktemp("sae"), d_in=64, width=128, layer=LAYER))


@pytest.fixture(scope="module")
def adapter_dir(cfg, cache_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from sparserm.model.backbone import load_causal_lm

    model, _ = load_causal_lm(cfg.model, cache_dir, torch.device("cpu"))
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def caches(ray_session, cfg, sae_dir, adapter_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("refcache")
    base = build_reference_cache(cfg, PAIRS, root / "base", sae_dir=sae_dir, layer=LAYER, progress=False)
    lora = build_reference_cache(cfg, PAIRS, root / "lora", adapter=adapter_dir, sae_dir=sae_dir, layer=LAYER,
                                 progress=False)
    return {None: base, adapter_dir: lora}


def direct(cfg, adapter, sae_dir):
    """pair_forward in this process, over the same forwards the pass makes."""
    from sparserm.align.pair_forward import pair_forward, tokenize_pairs
    from sparserm.model.backbone import load_causal_lm
    from sparserm.sae.autoencoder import SparseAutoencoder

    model, tok = load_causal_lm(cfg.model, cfg.run.cache_dir, torch.device("cpu"))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    sae = SparseAutoencoder.load(sae_dir)
    g = cfg.align.generate
    seqs = tokenize_pairs(tok, PAIRS, g.max_prompt_tokens + g.max_new_tokens, cfg.model.chat_template)
    outs = []
    with torch.no_grad():
        for idx in forward_batches(len(PAIRS), cfg.align.reference_cache.batch_size):
            outs.append(pair_forward(model, seqs, idx, tok.pad_token_id, "cpu", needs=frozenset({"features"}),
                                     sae=sae, layer=LAYER))
    cat = lambda f: torch.cat([f(o) for o in outs])  # noqa: E731
    return ([cat(lambda o, i=i: o.stats.as_tuple()[i]) for i in range(4)],
            cat(lambda o: o.chosen_features), cat(lambda o: o.rejected_features))


def test_forward_batches_split_like_ray():
    assert forward_batches(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert forward_batches(6, 3) == [[0, 1, 2], [3, 4, 5]]
    assert forward_batches(2, 8) == [[0, 1]]


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_cache_equals_direct_pair_forward(caches, cfg, sae_dir, adapter_dir, with_adapter):
    adapter = adapter_dir if with_adapter else None
    ref = load_reference_cache(caches[adapter], cache_key(cfg, PAIRS, adapter, sae_dir, LAYER))
    assert ref.n_pairs == len(PAIRS) and ref.d_sae == 128
    stats, fw, fl = direct(cfg, adapter, sae_dir)
    for got, want in zip(ref.stats.as_tuple(), stats):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=1e-6)
    everyone = list(range(len(PAIRS)))
    for side, want in (("chosen", fw), ("rejected", fl)):
        dense = ref.features(everyone, side)
        assert dense.dtype == torch.float32 and dense.shape == (len(PAIRS), 128)
        torch.testing.assert_close(dense, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ref.features([5, 1], side), want[[5, 1]], rtol=0, atol=0)
        for i in everyone:
            idx, val = ref.rows[side].row(i)
            assert len(idx) == int((dense[i] != 0).sum()) > 0  # every nonzero, and nothing else
            assert np.all(np.diff(val) <= 0) and idx.dtype == np.int32 and val.dtype == np.float32
    if with_adapter:  # the adapter changes the reference
        base = load_reference_cache(caches[None], cache_key(cfg, PAIRS, None, sae_dir, LAYER))
        assert (base.stats.chosen - ref.stats.chosen).abs().max() > 1e-3
    manifest = json.loads((caches[adapter] / "manifest.json").read_text())
    assert manifest["key"]["stored"] == "all_nonzero" and manifest["key"]["dtype"] == "float32"
    assert manifest["n_pairs"] == len(PAIRS) and manifest["seconds"] > 0


def test_same_key_reuses_without_a_pass(caches, cfg, sae_dir, monkeypatch):
    import sparserm.fpo.reference_cache as rc

    def no_pass(*a, **k):
        raise AssertionError("a second build with the same key ran a pass")

    monkeypatch.setattr(rc, "_run_pass", no_pass)
    before = (caches[None] / "manifest.json").stat().st_mtime_ns
    assert build_reference_cache(cfg, PAIRS, caches[None], sae_dir=sae_dir, layer=LAYER) == caches[None]
    assert (caches[None] / "manifest.json").stat().st_mtime_ns == before


def test_other_key_is_refused_by_name_and_left_intact(caches, cfg, sae_dir, adapter_dir, monkeypatch):
    import sparserm.fpo.reference_cache as rc

    monkeypatch.setattr(rc, "_run_pass", lambda *a, **k: pytest.fail("a refused build ran a pass"))
    out = caches[None]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = [dict(p) for p in PAIRS]
    other[0]["chosen"] += " Then eat it."
    for kwargs, field in (({"layer": 1}, "layer"), ({"adapter": adapter_dir}, "reference.adapter"),
                          ({"pairs": other}, "data")):
        args = {"pairs": PAIRS, "adapter": None, "layer": LAYER, **kwargs}
        with pytest.raises(StaleArtifactError, match=rf"differs in: {field}\)"):
            build_reference_cache(cfg, args["pairs"], out, adapter=args["adapter"], sae_dir=sae_dir,
                                  layer=args["layer"])
        with pytest.raises(StaleArtifactError, match=rf"differs in: {field}\)"):
            load_reference_cache(out, cache_key(cfg, args["pairs"], args["adapter"], sae_dir, args["layer"]))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(before) == ["manifest.json", "reference.parquet"]
    assert not list(out.parent.glob(".base.tmp-*"))  # no temporary folder left behind


def test_missing_or_incomplete_cache_is_named(tmp_path, cfg, sae_dir):
    key = cache_key(cfg, PAIRS, None, sae_dir, LAYER)
    with pytest.raises(FileNotFoundError, match="no complete reference cache"):
        load_reference_cache(tmp_path / "nowhere", key)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text(json.dumps({"key": key, "n_pairs": 7, "d_sae": 128}))
    with pytest.raises(FileNotFoundError, match="missing reference.parquet"):
        load_reference_cache(tmp_path / "half", key)


def test_a_failed_pass_leaves_no_folder(tmp_path, cfg, sae_dir, monkeypatch):
    import sparserm.fpo.reference_cache as rc

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rc, "_run_pass", killed)
    with pytest.raises(KeyboardInterrupt):
        build_reference_cache(cfg, PAIRS, tmp_path / "cache", sae_dir=sae_dir, layer=LAYER, progress=False)
    assert list(tmp_path.iterdir()) == []
