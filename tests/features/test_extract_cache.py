import json

import numpy as np
import pytest
import torch

from sparserm.config import Config, DataConfig, DataSource, FeaturesConfig, ModelConfig, RunConfig
from sparserm.features.cache import ActivationCache
from sparserm.features.stage import cache_root, prepare_data, run_features
from sparserm.model.backbone import load_backbone
from sparserm.model.forward import group_states
from sparserm.model.text import encode_group


def _write_pairs(path, n):
    rows = [{"prompt": f"Question {i}: how do I bake bread?", "chosen": f"Mix flour and water {i}.",
             "rejected": "I won't help with that." + " no" * (i % 3)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    return path


@pytest.fixture()
def cfg(tmp_path, tiny_model_dir, cache_dir):
    data = _write_pairs(tmp_path / "pairs.jsonl", 12)
    return Config(run=RunConfig(cache_dir=str(tmp_path / "cache"), seed=3),
                  data=DataConfig(sources=(DataSource(path=str(data)),), eval_fraction=0.25),
                  model=ModelConfig(name=str(tiny_model_dir), layer=2, extra_layers=(1,), max_tokens=32),
                  features=FeaturesConfig(batch_size=4, chunk_pairs=5, token_sample_rate=0.5)).validate()


def test_pass_writes_pooled_states_equal_to_direct_forward(cfg, tmp_path, ray_session, cache_dir):
    out = tmp_path / "run"
    out.mkdir()
    cache = run_features(cfg, out)
    assert cache.is_complete and cache.summary["n_pairs"] == 12 and cache.summary["d_model"] == 64
    assert sum(1 for _ in open(out / "rejects.jsonl")) == 1  # the invalid JSON line, recorded not crashed on
    table = cache.read_pooled(2)
    assert table.states.shape == (24, 64)
    assert set(table.meta["split"]) <= {"train", "eval"}
    # the shared computation equals a direct unshared forward of the same texts
    bb = load_backbone(cfg.model, cache_dir)
    ids, hw, hl = table.pairs()
    rows = {r["row_id"]: r for r in prepare_data(cfg).rows}
    for k in (0, 5, 11):
        r = rows[ids[k]]
        g = encode_group(bb.tokenizer, r["prompt"], [r["chosen"], r["rejected"]], 32)
        ref = group_states(bb, g, share_prefix=False)
        assert torch.allclose(hw[k], ref[0].states[2][-1], atol=1e-4)
        assert torch.allclose(hl[k], ref[1].states[2][-1], atol=1e-4)
    # the token sample: prompt tokens once per pair, about half the tokens, only from the asked split
    x, t = cache.read_tokens(2, 64, split=None)
    computed = int(table.meta["n_computed"].sum())
    assert 0.3 * computed < len(x) < 0.7 * computed and len(x) == len(t)
    xt, _ = cache.read_tokens(2, 64, split="train")
    xe, _ = cache.read_tokens(2, 64, split="eval")
    assert len(xt) + len(xe) == len(x)
    assert len(cache.read_tokens(2, 64, split=None, limit=10)[0]) == 10


def test_complete_cache_is_reused_and_a_stopped_pass_resumes(cfg, tmp_path, ray_session, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    data = prepare_data(cfg)
    root = cache_root(cfg, data.checksums)
    import sparserm.features.extract as extract

    calls = []
    real = extract.extract_to_parquet

    def stop_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("stopped")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "extract_to_parquet", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_features(cfg, out)
    cache = ActivationCache(root)
    assert cache.chunk_done(0) and not cache.chunk_done(1) and not cache.is_complete

    monkeypatch.setattr(extract, "extract_to_parquet", lambda *a, **k: (calls.append(2), real(*a, **k)))
    run_features(cfg, out)
    assert calls == [1, 2, 2]  # chunks 1 and 2 only: chunk 0 was not recomputed
    assert cache.is_complete and len(cache.read_pooled(2).states) == 24

    monkeypatch.setattr(extract, "extract_to_parquet", lambda *a, **k: pytest.fail("model pass re-run"))
    assert run_features(cfg, out).root == root


def test_cache_key_changes_with_what_changes_the_pass(cfg):
    data = prepare_data(cfg)
    base = cache_root(cfg, data.checksums)
    from dataclasses import replace

    assert cache_root(replace(cfg, model=replace(cfg.model, pooling="mean")), data.checksums) != base
    assert cache_root(replace(cfg, model=replace(cfg.model, max_tokens=64)), data.checksums) != base
    assert cache_root(replace(cfg, features=replace(cfg.features, batch_size=2)), data.checksums) == base
    assert cache_root(cfg, {k: "other" for k in data.checksums}) != base
