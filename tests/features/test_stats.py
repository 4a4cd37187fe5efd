"""Latent frequencies from pooled states (sparserm.features.stats): counts per side of one split, in batches."""
import numpy as np
import pytest
import torch

from sparserm.features.cache import PooledTable
from sparserm.features.stats import latent_frequencies
from sparserm.sae.autoencoder import SparseAutoencoder
from sparserm.testing import build_tiny_sae


@pytest.fixture(scope="module")
def sae(tmp_path_factory):
    return SparseAutoencoder.load(build_tiny_sae(tmp_path_factory.mktemp("stats-sae"), d_in=16, width=24))


def _pooled(n=50, d=16, seed=0):
    g = np.random.default_rng(seed)
    meta = {"side": np.array(["chosen", "rejected"] * (n // 2)), "split": g.choice(["train", "eval"], n, p=[0.7, 0.3])}
    return PooledTable(meta, torch.from_numpy(g.standard_normal((n, d)).astype(np.float32)))


def test_counts_each_sides_active_texts_of_the_split_only_whatever_the_batch(sae):
    pooled = _pooled()
    active = (sae.encode(pooled.states) > 0).numpy()
    train = pooled.meta["split"] == "train"
    for side in ("chosen", "rejected"):
        rows = train & (pooled.meta["side"] == side)
        assert rows.sum() > 0 and (~train & (pooled.meta["side"] == side)).sum() > 0  # both splits hold texts
    for batch_size in (7, 1024):
        f = latent_frequencies(pooled, sae, split="train", batch_size=batch_size)
        np.testing.assert_array_equal(f.count_w, active[train & (pooled.meta["side"] == "chosen")].sum(0))
        np.testing.assert_array_equal(f.count_l, active[train & (pooled.meta["side"] == "rejected")].sum(0))
        assert (f.n_w, f.n_l) == ((train & (pooled.meta["side"] == "chosen")).sum(),
                                  (train & (pooled.meta["side"] == "rejected")).sum())
        assert f.count_w.shape == (24,) and 0 < f.mu_w.max() <= 1 and f.count_w.sum() > 0
    ev = latent_frequencies(pooled, sae, split="eval")
    assert ev.n_w + ev.n_l == (~train).sum() and not np.array_equal(ev.count_w, f.count_w)


def test_a_split_without_texts_is_named(sae):
    with pytest.raises(ValueError, match="no val-split texts in activation cache /x"):
        latent_frequencies(_pooled(), sae, split="val", where="activation cache /x")
