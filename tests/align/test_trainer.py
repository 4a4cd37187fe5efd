"""DPO with LoRA under DeepSpeed on Ray Train (CPU, gloo): what changes, what does not, and resume
(a stopped and resumed run ends where an unbroken one does)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def cfg(tiny_align_config):
    return tiny_align_config("align.train.epochs=3", "align.train.lr=5e-3")


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
    assert cfgjson["r"] == cfg.align.train.lora.r


def test_deepspeed_config_from_align_config(cfg):
    from sparserm.align.trainer import ds_config

    ds = ds_config(cfg.align.train, world=1, bf16=False)
    assert ds["zero_optimization"]["stage"] == cfg.align.train.deepspeed_stage
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] == cfg.align.train.batch_size
    assert ds["bf16"]["enabled"] is False and ds_config(cfg.align.train, 2, True)["bf16"]["enabled"] is True


def test_two_workers_each_checkpoint_their_optimizer_share_and_resume_exactly(tiny_align_config, ray_session,
                                                                               tmp_path, dpo_pairs):
    from sparserm.align.trainer import train_dpo

    cfg = tiny_align_config("align.train.epochs=2", "align.train.lr=5e-3", "align.train.num_workers=2", "align.train.num_cpus=1",
                            "align.train.torch_threads=1")
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


@pytest.mark.parametrize("reference", ["previous", "base"])
def test_reference_matches_the_policy_before_the_first_step_in_bf16(tiny_align_config, ray_session, tmp_path,
                                                                     dpo_pairs, reference):
    """Under bf16 the reference log-probs come from the same engine in the same dtype, so u = 0 at step 0
    (before: fp32 reference, bf16 policy, |u| ~ beta x the bf16 rounding of summed log-probs). From a trained
    adapter, ``base`` is the model without it: u != 0 at step 0, exactly as DPO against the base means."""
    from sparserm.align.trainer import train_dpo

    cfg = tiny_align_config("align.train.epochs=1", "align.train.lr=5e-3", "align.train.precision=bf16",
                            f"align.reference={reference}")
    first = train_dpo(cfg, dpo_pairs, storage_dir=tmp_path, name="r1", progress=False)
    h = first["history"][0]
    assert h["dtype"] == "torch.bfloat16" and h["u_abs_max_before_first_step"] < 1e-6
    second = train_dpo(cfg, dpo_pairs, storage_dir=tmp_path, name="r2", init_adapter=first["adapter"], progress=False)
    u0 = second["history"][0]["u_abs_max_before_first_step"]
    if reference == "previous":
        assert u0 < 1e-6  # the reference is the policy this round starts from
    else:
        assert u0 > 1e-3  # the reference is the base; the policy starts at the trained adapter


def test_fingerprint_covers_training_only(tiny_align_config, ray_session, tmp_path, dpo_pairs):
    """An evaluation or sampling setting does not block a resume; a training setting does."""
    from sparserm.align.trainer import train_dpo

    cfg = tiny_align_config("align.train.epochs=2", "align.train.lr=5e-3")
    first = train_dpo(cfg, dpo_pairs[:4], storage_dir=tmp_path, name="fp", stop_after_epoch=1, progress=False)
    assert not first["finished"]
    other_eval = tiny_align_config("align.train.epochs=2", "align.train.lr=5e-3", "align.eval.mc_questions=7",
                                   "align.generate.temperature=0.2")
    resumed = train_dpo(other_eval, dpo_pairs[:4], storage_dir=tmp_path, name="fp", progress=False)
    assert resumed["finished"] and resumed["history"][0] == first["history"][0]
    with pytest.raises(ValueError, match="other pairs or settings"):
        train_dpo(tiny_align_config("align.train.epochs=2", "align.train.lr=1e-3"), dpo_pairs[:4],
                  storage_dir=tmp_path, name="fp", progress=False)
