import json

import numpy as np
import pytest
import torch

from sparserm.config import SAEConfig, TrackingConfig
from sparserm.sae import SAELoadError, SparseAutoencoder, evaluate_sae, load_registry, load_sae, massive_token_mask, train_sae
from sparserm.testing import tensorboard_scalars
from sparserm.tracking import Tracker, tracking_spec


def synthetic(n=6000, d=32, atoms=128, active=4, seed=0, n_massive=30):
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=-1)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) + 0.5
    x = (coef.unsqueeze(-1) * dictionary[idx]).sum(1) * 300 + 50
    planted = torch.randperm(n, generator=g)[:n_massive]
    x[planted] *= 80
    mask = torch.zeros(n, dtype=torch.bool)
    mask[planted] = True
    return x, mask


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    x, mask = synthetic()
    out = tmp_path_factory.mktemp("sae") / "sae"
    with Tracker(tracking_spec(TrackingConfig(), out.parent / "tensorboard", "sae")) as tracker:
        sae = train_sae(x[~mask][:5000], width=256, k=8, lr=3e-3, batch_size=256, training_tokens=256 * 300,
                        out_dir=out, layer=3, progress=False, tracker=tracker)
    return sae, out, x, mask


def test_every_step_is_tracked_as_sae_lens_builds_its_metrics(trained):
    """Steps 0..299 (sae-lens' step count), each once; the loss is the one the SAE's meta file records."""
    _, out, _, _ = trained
    meta = json.loads((out / "sparserm_sae.json").read_text())
    tb = tensorboard_scalars(out.parent / "tensorboard")
    assert meta["steps"] == 300 and len(meta["loss_history"]) == 300
    assert tb["losses/overall_loss"] == [(i, np.float32(v)) for i, v in enumerate(meta["loss_history"])]
    assert {"losses/mse_loss", "metrics/explained_variance", "metrics/l0", "details/current_learning_rate"} <= set(tb)
    assert all([s for s, _ in points] == list(range(300)) for points in tb.values())
    assert {v for _, v in tb["metrics/l0"]} == {8.0}  # TopK: k latents on every token
    lr = [v for _, v in tb["details/current_learning_rate"]]  # constant, then decayed over the last fifth
    assert lr[0] == lr[239] == np.float32(3e-3) and lr[-1] < lr[239]


def test_massive_mask_flags_exactly_the_planted_tokens():
    x, mask = synthetic()
    assert torch.equal(massive_token_mask(x, 10.0), mask)


def test_training_reconstructs_held_out_data_in_raw_space(trained):
    sae, out, x, mask = trained
    held = x[5000:]
    m = evaluate_sae(sae, held, mask[5000:])
    assert m["fvu"] < 0.25 and m["l0"] <= 8 + 1e-6 and m["n_massive"] == int(mask[5000:].sum())
    assert m["fvu_all"] > m["fvu"]  # massive tokens were never fitted
    # W_dec rows are raw-space directions: decode(f) == f @ W_dec + b_dec
    f = sae.encode(held[:16])
    assert torch.allclose(sae.decode(f), f @ sae.W_dec + sae.sae.b_dec, rtol=1e-4, atol=1e-2)
    assert sae.d_in == 32 and sae.d_sae == 256


def test_saved_folder_reloads_identically_and_is_not_pickle(trained):
    sae, out, x, _ = trained
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparserm_sae.json"]
    meta = json.loads((out / "sparserm_sae.json").read_text())
    assert meta["complete"] and meta["layer"] == 3
    again = load_sae(SAEConfig(source="train"), trained_dir=out)
    assert torch.equal(again.encode(x[:32]), sae.encode(x[:32]))
    local = load_sae(SAEConfig(source="local", path=str(out)))
    assert torch.equal(local.decode(local.encode(x[:8])), sae.decode(sae.encode(x[:8])))


def test_evaluate_sae_hand_built_cases():
    class Identity:  # perfect reconstruction and reconstruction by the mean, on a real SAE object shape
        d_sae = 4

        def __init__(self, mean=None):
            self.mean = mean

        def encode(self, h):
            return torch.cat([h.clamp(min=0), torch.zeros(len(h), 2)], dim=1)[:, :4]

        def decode(self, f):
            return f[:, :2] if self.mean is None else self.mean.expand(len(f), -1)

    h = torch.tensor([[1.0, 2.0], [3.0, 1.0], [2.0, 5.0]])
    assert evaluate_sae(Identity(), h)["fvu"] == pytest.approx(0.0)
    assert evaluate_sae(Identity(mean=h.mean(0, keepdim=True)), h)["fvu"] == pytest.approx(1.0)
    m = evaluate_sae(Identity(), h)
    assert m["dead_fraction"] == pytest.approx(0.5) and m["l0"] == pytest.approx(2.0)
    # one token left, or all but one massive: no variance to divide by (was a ZeroDivisionError)
    with pytest.raises(ValueError, match="1 of the 1 evaluation tokens are not massive"):
        evaluate_sae(Identity(), h[:1])
    with pytest.raises(ValueError, match="1 of the 3 evaluation tokens"):
        evaluate_sae(Identity(), h, torch.tensor([True, True, False]))


def test_registry_and_local_errors_name_what_is_missing(tmp_path):
    with pytest.raises(SAELoadError, match="no-such-release"):
        load_registry("no-such-release", "x")
    with pytest.raises(SAELoadError, match="layer_99"):
        load_registry("gemma-scope-2b-pt-res-canonical", "layer_99/width_16k/canonical")
    with pytest.raises(SAELoadError, match="cfg.json"):
        SparseAutoencoder.load(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        train_sae(torch.randn(10, 4), batch_size=64, out_dir=tmp_path / "s", layer=0)
