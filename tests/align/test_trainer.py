"""DPO with LoRA under DeepSpeed on Ray Train (CPU, gloo): what changes, what does not, and resume
(a stopped and resumed run ends where an unbroken one does)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def cfg(tiny_align_config):
    return tiny_align_config("align.epochs=3", "align.lr=5e-3")


def test_adapter_changes_base_does_not_and_resume_continues(cfg, ray_session, tmp_path, tiny_model_dir, dpo_pairs):
    PAIRS = dpo_pairs[:6]
    from sparserm.align.trainer import frozen_checksum, train_dpo

    first = train_dpo(cfg, PAIRS, storage_dir=tmp_path, name="dpo", stop_after_epoch=1, progress=False)
    assert not first["finished"] and [h["epoch"] for h in first["history"]] == [1]
    adapter1 = load_file(str(Path(first["adapter"]) / "adapter_model.safetensors"))
    assert adapter1 and all("lora_" in k for k in adapter1)  # only adapter weights are saved
    # LoRA's B matrices start at zero; after training they must have moved
    assert max(v.abs().max().item() for k, v in adapter1.items() if "lora_B" in k) > 0

    with pytest.raises(ValueError, match="other pairs or settings"):  # refused before any work starts
        train_dpo(cfg, PAIRS[:4], storage_dir=tmp_path, name="dpo", progress=False)
    resumed = train_dpo(cfg, PAIRS, storage_dir=tmp_path, name="dpo", progress=False)
    hist = resumed["history"]
    assert resumed["finished"] and [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[0] == first["history"][0]  # epoch 1 was not redone
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["reward_accuracy"] >= 0.5

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for p in base.parameters():
        p.requires_grad_(False)
    on_disk = frozen_checksum(base)
    for h in hist:  # the frozen base weights never moved during training
        assert h["base_checksum"] == pytest.approx(on_disk, rel=1e-12)
        assert h["base_checksum_after"] == pytest.approx(on_disk, rel=1e-12)
    adapter3 = load_file(str(Path(resumed["adapter"]) / "adapter_model.safetensors"))
    assert any(not torch.equal(adapter1[k], adapter3[k]) for k in adapter1)
    assert sorted(p.name for p in (Path(resumed["adapter"]).parent / "optimizer").iterdir()) == [
        "rank_0.json", "rank_0.safetensors"]

    # the resumed run took the same steps as an unbroken one: same data order and the optimizer's moments
    # carried over (restarting them moves the adapter well beyond this tolerance)
    unbroken = train_dpo(cfg, PAIRS, storage_dir=tmp_path, name="unbroken", progress=False)
    assert [h["loss"] for h in unbroken["history"]] == pytest.approx([h["loss"] for h in hist], rel=1e-5)
    adapter_u = load_file(str(Path(unbroken["adapter"]) / "adapter_model.safetensors"))
    for k in adapter_u:
        torch.testing.assert_close(adapter3[k], adapter_u[k], rtol=1e-5, atol=1e-7)
    cfgjson = json.loads((Path(resumed["adapter"]) / "adapter_config.json").read_text())
    assert cfgjson["r"] == cfg.align.lora.r


def test_deepspeed_config_from_align_config(cfg):
    from sparserm.align.trainer import ds_config

    ds = ds_config(cfg.align, world=1, use_gpu=False)
    assert ds["zero_optimization"]["stage"] == cfg.align.deepspeed_stage
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] == cfg.align.batch_size
    assert ds["bf16"]["enabled"] is False and ds_config(cfg.align, 2, True)["bf16"]["enabled"] is True


def test_two_workers_each_checkpoint_their_optimizer_share_and_resume_exactly(tiny_align_config, ray_session,
                                                                               tmp_path, dpo_pairs):
    from sparserm.align.trainer import train_dpo

    cfg = tiny_align_config("align.epochs=2", "align.lr=5e-3", "align.num_workers=2", "align.cpus_per_worker=1",
                            "align.torch_threads=1")
    pairs = dpo_pairs[:8]
    first = train_dpo(cfg, pairs, storage_dir=tmp_path, name="dpo2", stop_after_epoch=1, progress=False)
    shares = sorted(p.name for p in (Path(first["adapter"]).parent / "optimizer").iterdir())
    assert shares == ["rank_0.json", "rank_0.safetensors", "rank_1.json", "rank_1.safetensors"]
    resumed = train_dpo(cfg, pairs, storage_dir=tmp_path, name="dpo2", progress=False)
    unbroken = train_dpo(cfg, pairs, storage_dir=tmp_path, name="unbroken2", progress=False)
    assert resumed["finished"] and [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in unbroken["history"]],
                                                                    rel=1e-5)
    a = load_file(str(Path(resumed["adapter"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(unbroken["adapter"]) / "adapter_model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
