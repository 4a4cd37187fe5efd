"""The feature-extraction actor killed (SIGKILL) mid-pass: Ray Data restarts it and redoes the calls it held, the
stage completes, and the cache holds every pair exactly once, with the states a direct forward gives."""
import collections

import torch

from sparserm.config import Config, DataConfig, DataSource, FeaturesConfig, ModelConfig, RunConfig
from sparserm.features.stage import cache_root, prepare_data, run_features
from sparserm.model.backbone import load_backbone
from sparserm.model.forward import group_states
from sparserm.model.text import encode_group
from tests.faults import actors, during, gone, kill, newest_alive_pid, wait_for
from tests.features.test_extract_cache import _write_pairs

N_PAIRS = 24  # one pair an actor call: 24 calls, one shard each


def test_an_actor_killed_mid_pass_is_restarted_and_every_pair_is_cached_once(tmp_path, tiny_model_dir, cache_dir,
                                                                             ray_session):
    data_file = _write_pairs(tmp_path / "pairs.jsonl", N_PAIRS)
    cfg = Config(run=RunConfig(cache_dir=str(tmp_path / "cache"), seed=3),
                 data=DataConfig(sources=(DataSource(path=str(data_file)),), eval_fraction=0.25),
                 model=ModelConfig(name=str(tiny_model_dir), layer=2, max_tokens=32),
                 features=FeaturesConfig(batch_size=1, num_cpus=1, token_sample_rate=0.5)).validate()
    data = prepare_data(cfg)
    shard_dir = cache_root(cfg, data.checksums) / "shards"

    def kill_after_the_first_shard():
        wait_for(lambda: list(shard_dir.glob("part-*.parquet")), "the pass's first shard", 300)
        actor_id, pid = newest_alive_pid("MapWorker")
        kill(pid)
        return actor_id, pid, len(list(shard_dir.glob("part-*.parquet")))

    out = tmp_path / "run"
    out.mkdir()
    cache, (actor_id, pid, shards_at_kill) = during(lambda: run_features(cfg, out, data), kill_after_the_first_shard)
    # the kill landed mid-pass, and Ray restarted that actor (its record keeps the count after the pool ends)
    assert 1 <= shards_at_kill < N_PAIRS and gone(pid)
    assert actors("MapWorker", state=None)[actor_id]["NumRestarts"] >= 1

    assert cache.is_complete and cache.summary["n_pairs"] == N_PAIRS
    table = cache.read_pooled(2)
    counts = collections.Counter(zip(table.meta["row_id"], table.meta["side"]))
    assert len(counts) == 2 * N_PAIRS and set(counts.values()) == {1}  # each text of each pair once
    assert len(list(shard_dir.glob("part-*.parquet"))) == N_PAIRS and not list(shard_dir.glob("*.tmp"))
    # the pairs redone after the kill hold what an unbroken pass computes
    bb = load_backbone(cfg.model, cache_dir)
    ids, hw, hl = table.pairs()
    rows = {r["row_id"]: r for r in data.rows}
    for k, row_id in enumerate(ids):
        r = rows[row_id]
        ref = group_states(bb, encode_group(bb.tokenizer, r["prompt"], [r["chosen"], r["rejected"]], 32),
                           share_prefix=False)
        assert torch.allclose(hw[k], ref[0].pooled(2, cfg.model.pooling), atol=1e-4)
        assert torch.allclose(hl[k], ref[1].pooled(2, cfg.model.pooling), atol=1e-4)
