"""Losses against hand-computed values; head save/load round trip; pair accuracy."""
import json

import pytest
import torch

from sparserm.reward.accuracy import pair_accuracy, paired_difference
from sparserm.reward.head import RewardHead, load_head, save_head
from sparserm.reward.losses import LOSSES, get_loss

S_W = torch.tensor([2.0, 0.0])
S_L = torch.tensor([0.5, 1.0])  # s_w - s_l = [1.5, -1.0]


def test_margin_loss():
    # mean(max(0, 1 - 1.5), max(0, 1 + 1)) = (0 + 2) / 2
    assert LOSSES["margin"](S_W, S_L).item() == pytest.approx(1.0)
    assert LOSSES["margin"](S_W, S_L, margin=2.0).item() == pytest.approx((0.5 + 3.0) / 2)


def test_bt_loss():
    # -log sigma(1.5) = log(1 + e^-1.5) = 0.2014133; -log sigma(-1) = log(1 + e) = 1.3132617
    assert LOSSES["bt"](S_W, S_L).item() == pytest.approx((0.2014133 + 1.3132617) / 2, abs=1e-6)


def test_bce_loss():
    # chosen -> 1: log(1+e^-2) = 0.1269280, log 2 = 0.6931472; rejected -> 0: log(1+e^0.5) = 0.9740770,
    # log(1+e^1) = 1.3132617
    expected = (0.1269280 + 0.6931472 + 0.9740770 + 1.3132617) / 4
    assert LOSSES["bce"](S_W, S_L).item() == pytest.approx(expected, abs=1e-6)


def test_loss_registry_and_gradients():
    assert set(LOSSES) == {"margin", "bt", "bce"}
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")
    s_w = S_W.clone().requires_grad_()
    LOSSES["bt"](s_w, S_L).backward()
    assert s_w.grad is not None and (s_w.grad < 0).all()  # raising s_w lowers the loss


def test_pair_accuracy():
    assert pair_accuracy(S_W, S_L) == 0.5
    assert pair_accuracy([1.0, 1.0], [1.0, 0.0]) == 0.5  # a tie is not a win
    with pytest.raises(ValueError):
        pair_accuracy([], [])


def test_head_shapes_standardisation_and_round_trip(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(50, 8) * 300 + 100  # projection-like scales
    head = RewardHead(8, hidden=16).fit_standardization(x)
    assert torch.allclose(head.x_mean, x.mean(0), rtol=1e-4)
    assert torch.allclose(head.x_std, x.std(0, unbiased=False), rtol=1e-4)
    out = head(x)
    assert out.shape == (50,)
    save_head(head, tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["head.json", "head.safetensors"]
    meta = json.loads((tmp_path / "h" / "head.json").read_text())
    assert meta["in_dim"] == 8 and meta["hidden"] == 16
    loaded = load_head(tmp_path / "h")
    assert torch.equal(loaded.x_mean, head.x_mean) and torch.equal(loaded.x_std, head.x_std)
    assert torch.equal(loaded(x), out)
    with pytest.raises(FileNotFoundError):
        load_head(tmp_path / "missing")


def test_constant_column_does_not_explode():
    x = torch.randn(20, 3)
    x[:, 1] = 5.0
    head = RewardHead(3, 4).fit_standardization(x)
    assert head.x_std[1] == 1.0 and torch.isfinite(head(x)).all()


def test_paired_difference_and_its_bootstrap_interval():
    assert paired_difference([1.0, 1.0, 1.0], [0.0, 0.0, 0.0]) == {"diff": 1.0, "lo": 1.0, "hi": 1.0}
    a = torch.tensor([1.0, 0.0] * 200)
    b = torch.tensor([1.0, 1.0] * 200)
    gap = paired_difference(a, b, n_boot=500)
    assert gap["diff"] == pytest.approx(-0.5) and gap["lo"] < -0.5 < gap["hi"] and gap["hi"] - gap["lo"] < 0.15
    # identical models: zero difference whatever the resample
    assert paired_difference(a, a) == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    with pytest.raises(ValueError, match="one length"):
        paired_difference([1.0], [1.0, 0.0])
