import collections
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
                  features=FeaturesConfig(batch_size=4, token_sample_rate=0.5)).validate()


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
        assert torch.allclose(hw[k], ref[0].pooled(2, cfg.model.pooling), atol=1e-4)
        assert torch.allclose(hl[k], ref[1].pooled(2, cfg.model.pooling), atol=1e-4)
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

    real = extract.extract_to_shards
    run_features(cfg, out)
    # What a stopped pass leaves on disk: some finished shards, no complete.json, perhaps a half-written file.
    cache = ActivationCache(root)
    shards = sorted(cache.shard_dir.glob("part-*.parquet"))
    assert len(shards) == 3  # 12 pairs in batches of 4, one shard per actor call
    for f in shards[1:]:
        f.unlink()
    (cache.root / "complete.json").unlink()
    (cache.shard_dir / "part-0000.parquet.123.tmp").write_bytes(b"half a parquet file")
    (cache.shard_dir / "chunk-00000").mkdir()  # an unfinished pass in the old layout
    (cache.shard_dir / "chunk-00000" / "x.parquet").write_bytes(b"old")
    done = cache.done_row_ids()
    assert len(done) == 4 and not cache.is_complete

    passed = []
    monkeypatch.setattr(extract, "extract_to_shards", lambda rows, *a, **k: (passed.append(rows), real(rows, *a, **k)))
    run_features(cfg, out)
    assert len(passed) == 1 and {r["row_id"] for r in passed[0]}.isdisjoint(done)  # done pairs not recomputed
    assert len(passed[0]) + len(done) == 12
    table = cache.read_pooled(2)
    assert cache.is_complete and len(table.states) == 24
    assert sorted(collections.Counter(table.meta["row_id"]).values()) == [2] * 12  # every pair once, both sides
    assert not list(cache.shard_dir.glob("*.tmp"))  # the half-written file was cleared away
    assert not (cache.shard_dir / "chunk-00000").exists()

    monkeypatch.setattr(extract, "extract_to_shards", lambda *a, **k: pytest.fail("model pass re-run"))
    assert run_features(cfg, out).root == root


def test_a_pair_stored_twice_stops_the_cache_from_completing(cfg, tmp_path, ray_session):
    out = tmp_path / "run"
    out.mkdir()
    cache = run_features(cfg, out)
    (cache.root / "complete.json").unlink()
    shard = sorted(cache.shard_dir.glob("part-*.parquet"))[0]
    (cache.shard_dir / "part-copy.parquet").write_bytes(shard.read_bytes())  # as if two passes wrote at once
    with pytest.raises(RuntimeError, match="once each"):
        run_features(cfg, out)
    assert not cache.is_complete


def test_cache_key_changes_with_what_changes_the_pass(cfg, monkeypatch):
    data = prepare_data(cfg)
    base = cache_root(cfg, data.checksums)
    from dataclasses import replace

    assert cache_root(replace(cfg, model=replace(cfg.model, pooling="mean")), data.checksums) != base
    assert cache_root(replace(cfg, model=replace(cfg.model, max_tokens=64)), data.checksums) != base
    assert cache_root(replace(cfg, features=replace(cfg.features, batch_size=2)), data.checksums) == base
    assert cache_root(cfg, {k: "other" for k in data.checksums}) != base
    import sparserm.model.text as text  # how texts become tokens changed: the old cache is not this pass's

    monkeypatch.setattr(text, "ENCODING_VERSION", text.ENCODING_VERSION + 1)
    assert cache_root(cfg, data.checksums) != base


def test_caches_in_the_chunk_layout_are_still_read(tmp_path, ray_session):
    """Caches written before the shard layout: Ray Data's own Parquet writer, in chunk folders marked _DONE."""
    import ray

    rng = np.random.default_rng(0)
    rows = [{"row_id": f"r{i // 2}", "prompt_id": "p", "source": "s", "split": "train",
             "side": ("chosen", "rejected")[i % 2], "text": "t", "n_tokens": 5, "n_computed": 5,
             "token_ids": np.arange(i + 1), "pooled_2": rng.standard_normal(8).astype(np.float32),
             "tokens_2": rng.standard_normal(8 * (i + 1)).astype(np.float32)} for i in range(6)]
    cache = ActivationCache(tmp_path / "old")
    for i, part in enumerate((rows[:4], rows[4:])):
        ray.data.from_items(part).write_parquet(str(cache.shard_dir / f"chunk-{i:05d}"))
        if i == 0:
            (cache.shard_dir / "chunk-00000" / "_DONE").write_text("{}")
    table = cache.read_pooled(2)  # the unfinished chunk 1 is not read
    assert table.states.shape == (4, 8) and cache.done_row_ids() == {"r0", "r1"}
    assert np.allclose(table.states[table.meta["row_id"] == "r1"].numpy(), np.stack([r["pooled_2"] for r in rows[2:4]]))
    x, t = cache.read_tokens(2, 8, split=None)
    assert x.shape == (1 + 2 + 3 + 4, 8) and len(t) == 10
