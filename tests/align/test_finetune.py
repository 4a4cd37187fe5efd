"""Full fine-tuning beside LoRA in the one preference trainer, and where each reference lives: once-computed
stats, an online reference through the same weights (LoRA, adapter off) or a frozen second copy (full),
FPO's cache with no reference model at all; every run reports its peak memory and time per step."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _weights(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_full_finetuning_moves_every_block_and_resumes(tiny_align_config, ray_session, tmp_path, dpo_pairs,
                                                       tiny_model_dir):
    from sparserm.align.trainer import train_dpo

    cfg = tiny_align_config("align.train.finetune=full", "align.train.epochs=2", "align.train.lr=1e-3")
    pairs = dpo_pairs[:4]
    first = train_dpo(cfg, pairs, storage_dir=tmp_path, name="full", stop_after_epoch=1, progress=False)
    assert first["adapter"] is None and (Path(first["model"]) / "config.json").is_file()
    h1 = first["history"][0]
    assert not h1["reference_copy"] and h1["reference_forwards"] == 2  # DPO stats: once (2 micro-batches), same weights
    assert h1["u_abs_max_before_first_step"] < 1e-5
    base, trained = _weights(tiny_model_dir), _weights(first["model"])
    moved = {k for k in base if k in trained and not torch.equal(base[k], trained[k])}
    # every decoder block's attention and MLP weights trained, not an adapter's
    assert {k.split(".")[2] for k in moved if k.startswith("model.layers.")} == {"0", "1", "2", "3"}
    assert any("mlp" in k for k in moved) and any("self_attn" in k for k in moved)
    resumed = train_dpo(cfg, pairs, storage_dir=tmp_path, name="full", progress=False)
    unbroken = train_dpo(cfg, pairs, storage_dir=tmp_path, name="full_unbroken", progress=False)
    assert resumed["finished"] and resumed["history"][0] == h1
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in unbroken["history"]],
                                                                    rel=1e-5)
    a, b = _weights(resumed["model"]), _weights(unbroken["model"])
    # every weight of the model trains here, and the CPU kernels of a fresh process (the resumed one) can round an
    # element differently: one of 2,048 once ended 1.09e-6 apart (CI, 2026-12-03). Adam's first step after its
    # moments restart is +-lr = 1e-3 for every weight, so a resume that lost them lands far outside this tolerance
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="finetune=full starts from the base"):
        train_dpo(cfg, pairs, storage_dir=tmp_path, name="full2", init_adapter=str(tmp_path), progress=False)


@pytest.mark.parametrize("finetune,copy", [("lora", False), ("full", True)])
def test_an_online_dpo_reference_is_the_adapter_off_model_or_a_frozen_copy(tiny_align_config, ray_session,
                                                                          tmp_path, dpo_pairs, finetune, copy):
    from sparserm.align.trainer import train_dpo

    cfg = tiny_align_config(f"align.train.finetune={finetune}", "align.train.reference_online=true",
                            "align.train.epochs=1", "align.train.lr=1e-3")
    h = train_dpo(cfg, dpo_pairs[:4], storage_dir=tmp_path, name="online", progress=False)["history"][0]
    assert h["reference_kind"] == "sequence" and h["reference_copy"] is copy
    assert h["reference_forwards"] == 0 and h["reference_forwards_in_steps"] == h["policy_micro_batches"] == 2
    # LoRA: the reference forward runs through the trained weights (adapter off); full: through the copy
    assert h["model_forwards_in_steps"] == (1 if copy else 2) * h["policy_micro_batches"]
    assert h["u_abs_max_before_first_step"] < 1e-5
    assert h["peak_rss_mb_above_baseline"] > 0 and h["seconds_per_step"] > 0 and h["peak_gpu_mb"] is None


def test_wrapping_a_model_in_an_adapter_prints_no_warning(tiny_align_config):
    # peft asks transformers' deprecated `is_gradient_checkpointing` (a FutureWarning in every worker's log)
    import warnings

    from sparserm.align.finetune import LoraWeights
    from sparserm.model.backbone import load_causal_lm

    cfg = tiny_align_config()
    model, _ = load_causal_lm(cfg.model, cfg.run.cache_dir, torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # shown even if this process showed it before
        peft_model = LoraWeights().prepare(model, cfg.align.train, None, seed=0)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert any(p.requires_grad for p in peft_model.parameters())
