"""Preference training with LoRA under DeepSpeed on Ray Train (CPU, gloo): what changes, what does not, resume
(a stopped and resumed run ends where an unbroken one does, its warm-up included; the run's fingerprint holds
its training settings only; the unbroken run at ZeRO-0, which trains as ZeRO-2), and objectives: SimPO without
a reference pass, and one registered inside a test, with no change to the trainer. Every Ray Train run costs
~10 s of start-up here, so each test makes the runs it needs serve every check they can."""
import math
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file


TRAIN = ("align.train.epochs=3", "align.train.lr=5e-3", "align.train.warmup_steps=3")


@pytest.fixture(scope="module")
def cfg(tiny_align_config):
    return tiny_align_config(*TRAIN)


def test_adapter_changes_base_does_not_and_resume_continues(cfg, tiny_align_config, ray_session, tmp_path,
                                                            tiny_model_dir, dpo_pairs):
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
    with pytest.raises(ValueError, match="other pairs or settings"):  # a training setting is in the fingerprint
        train_dpo(tiny_align_config(*TRAIN, "align.train.lr=1e-3"), PAIRS, storage_dir=tmp_path, name="dpo",
                  progress=False)
    # an evaluation or sampling setting is not: the run resumes under them
    other_eval = tiny_align_config(*TRAIN, "align.eval.mc_questions=7", "align.generate.temperature=0.2")
    resumed = train_dpo(other_eval, PAIRS, storage_dir=tmp_path, name="dpo", progress=False)
    hist = resumed["history"]
    assert resumed["finished"] and [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[0] == first["history"][0]  # epoch 1 was not redone
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["reward_accuracy"] >= 0.5
    # 6 pairs, 4 a step: 2 optimizer steps an epoch; step k (over the run) at 5e-3 * min(1, (k + 1) / 3), the
    # resumed epochs 2-3 continuing at global step 2 (a schedule restarted at 0 would run epoch 2 at 5e-3/3, 2/3)
    lr = [5e-3 * min(1.0, (k + 1) / 3) for k in range(6)]
    assert [h["lr"] for h in hist] == [pytest.approx(lr[0:2]), pytest.approx(lr[2:4]), pytest.approx(lr[4:6])]
    assert [h["global_step"] for h in hist] == [2, 4, 6]
    # each step's loss and accuracy are of its 4 pairs: the epoch's are their mean
    assert [sum(h["step_loss"]) / 2 for h in hist] == pytest.approx([h["loss"] for h in hist], rel=1e-12)
    assert [sum(h["step_reward_accuracy"]) / 2 for h in hist] == pytest.approx([h["reward_accuracy"] for h in hist])
    # what rank 0 logged to TensorBoard (on by default), read back: the history's steps and epochs, each once (the
    # resumed process logged epochs 2-3 only), at global steps
    from sparserm.testing import tensorboard_scalars

    tb = tensorboard_scalars(tmp_path / "dpo" / "tensorboard")
    for tag, key in (("loss", "step_loss"), ("reward_accuracy", "step_reward_accuracy"), ("lr", "lr")):
        assert tb[f"step/{tag}"] == [(k + 1, np.float32(v)) for k, v in enumerate(v for h in hist for v in h[key])]
    for key in ("epoch", "loss", "reward_accuracy", "reward_margin", "global_step", "base_checksum"):
        assert tb[f"epoch/{key}"] == [(h["global_step"], np.float32(h[key])) for h in hist]

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
    # carried over (restarting them moves the adapter well beyond this tolerance). The unbroken run is ZeRO
    # stage 0, which on one worker turns DeepSpeed's gradient all-reduce off (the identity there, and a flat copy
    # of every gradient): it trains as ZeRO-2 (the default), which needs the all-reduce
    unbroken = train_dpo(tiny_align_config(*TRAIN, "align.train.deepspeed_stage=0"), PAIRS, storage_dir=tmp_path,
                         name="unbroken", progress=False)
    assert cfg.align.train.deepspeed_stage == 2
    assert [h["loss"] for h in unbroken["history"]] == pytest.approx([h["loss"] for h in hist], rel=1e-5)
    assert [h["lr"] for h in unbroken["history"]] == [h["lr"] for h in hist]
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
    """Under ZeRO-3 (ZeRO-2 across two workers: tests/cluster/test_multinode.py), with an odd number of pairs.
    Before, this hung in the reference pass (one rank had a forward fewer, and ZeRO-3's are collective), then
    failed in the first backward (the chunked head's recompute found its weight released) and in the first
    checkpoint (ZeRO-3 empties its optimizer's param groups between steps)."""
    from sparserm.align.trainer import train_dpo

    cfg = tiny_align_config("align.train.epochs=2", "align.train.lr=5e-3", "align.train.num_workers=2",
                            "align.train.num_cpus=1", "align.train.torch_threads=1", "align.train.deepspeed_stage=3")
    pairs = dpo_pairs[:7]
    first = train_dpo(cfg, pairs, storage_dir=tmp_path, name="dpo2", stop_after_epoch=1, progress=False)
    assert first["history"][0]["reference_forwards"] == 2  # 4 positions a rank, 2 a forward (one repeats a pair)
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


def test_reference_matches_the_policy_before_the_first_step_in_bf16(tiny_align_config, ray_session, tmp_path,
                                                                     dpo_pairs):
    """Under bf16 the reference log-probs come from the same engine in the same dtype, so u = 0 at step 0
    (before: fp32 reference, bf16 policy, |u| ~ beta x the bf16 rounding of summed log-probs). From a trained
    adapter, ``previous`` is the policy the round starts from (u = 0 at step 0 again) and ``base`` is the model
    without it: u != 0 at step 0, exactly as DPO against the base means."""
    from sparserm.align.trainer import train_dpo

    def cfg(reference):
        return tiny_align_config("align.train.epochs=1", "align.train.lr=5e-3", "align.train.precision=bf16",
                                 f"align.reference={reference}")

    first = train_dpo(cfg("previous"), dpo_pairs, storage_dir=tmp_path, name="r1", progress=False)
    h = first["history"][0]
    assert h["dtype"] == "torch.bfloat16" and h["u_abs_max_before_first_step"] < 1e-6
    u0 = {reference: train_dpo(cfg(reference), dpo_pairs, storage_dir=tmp_path, name=f"r2-{reference}",
                               init_adapter=first["adapter"], progress=False)["history"][0]["u_abs_max_before_first_step"]
          for reference in ("previous", "base")}
    assert u0["previous"] < 1e-6  # the reference is the policy this round starts from
    assert u0["base"] > 1e-3  # the reference is the base; the policy starts at the trained adapter


def test_an_objective_registered_in_a_test_trains_with_no_change_to_the_trainer(tiny_align_config, ray_session,
                                                                               tmp_path, dpo_pairs):
    """IPO (Azar et al. 2023), defined here: loss = (h - 1/(2 tau))^2, h the log-ratio margin, tau = beta. The
    class is local, so it reaches the Ray Train worker pickled by value, with nothing in the package."""
    from sparserm.align.objectives import OBJECTIVES, Objective, register
    from sparserm.align.trainer import train_dpo

    class IPO(Objective):
        name, reference, beta = "ipo_test", "sequence", 0.5

        def loss(self, policy, reference, cfg):
            pol, ref = policy.stats, reference.stats
            h = (pol.chosen - ref.chosen) - (pol.rejected - ref.rejected)
            return (h - 1 / (2 * self.beta_of(cfg))) ** 2, h.detach()

    register(IPO)
    try:
        # early stopping on, which holds out a share of the pairs for validation
        cfg = tiny_align_config("align.loss.name=ipo_test", "align.train.epochs=2", "align.train.lr=1e-3",
                                "align.train.val_fraction=0.25", "align.train.patience=1")
        # one pair, fewer than one step of 4 (a round whose filter kept 1 pair): it fills the step 4 times, and
        # is not split for validation (it trains, and the latest epoch counts as the best)
        res = train_dpo(cfg, dpo_pairs[:1], storage_dir=tmp_path, name="ipo", progress=False)
    finally:
        OBJECTIVES.pop("ipo_test")
    h1, h2 = res["history"]
    # epoch 1's two micro-batches both run before its one optimizer step, where the policy is the reference
    # (previous = the fresh adapter, LoRA B = 0): h = 0, loss = (0 - 1/(2 x 0.5))^2 = 1
    assert h1["objective"] == "ipo_test" and h1["reference_kind"] == "sequence" and h1["reference_forwards"] == 1
    assert h1["n_pairs"] == 1 and h1["lr"] and len(h1["step_loss"]) == 1 and h1["policy_micro_batches"] == 2
    assert "val_loss" not in h1 and "stopped_early_at" not in h2 and Path(res["adapter"]).name == "best"
    assert res["best_epoch"] == 2
    assert h1["loss"] == pytest.approx(1.0, abs=1e-4) and h1["u_abs_max_before_first_step"] < 1e-4
    assert h1["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # mean h / beta
    # d loss / dh = 2 (h - 1) < 0 at h = 0: the step raised h (logged as reward_margin = mean h / beta)
    assert h2["reward_margin"] > 0 and h2["reward_accuracy"] > 0.5
    assert h2["loss"] < h1["loss"]  # (at lr 5e-3 one Adam step overshoots h = 1 on this squared loss; 1e-3 not)
    ref = load_file(str(Path(res["adapter"]).parent / "reference.safetensors"))
    assert sorted(ref) == ["chosen", "chosen_tokens", "rejected", "rejected_tokens"] and ref["chosen"].shape == (1,)


def test_simpo_trains_without_a_reference_pass(tiny_align_config, ray_session, tmp_path, dpo_pairs):
    from sparserm.align.pair_forward import pair_forward, tokenize_pairs
    from sparserm.align.trainer import train_dpo
    from sparserm.model.backbone import load_causal_lm

    cfg = tiny_align_config("align.loss.name=simpo", "align.train.epochs=2", "align.train.lr=5e-3")
    pairs = dpo_pairs[:4]
    res = train_dpo(cfg, pairs, storage_dir=tmp_path, name="simpo", progress=False)
    h1, h2 = res["history"]
    assert h1["objective"] == "simpo" and h1["reference_kind"] == "none" and h1["reference_forwards"] == 0
    assert not (Path(res["adapter"]).parent / "reference.safetensors").exists()  # nothing computed, nothing stored

    # epoch 1 is all before its one optimizer step, where the policy is the base model (LoRA B = 0): its loss
    # is the mean of -log sigma(2 (a_w - a_l) - 0.5) under the base, a = summed log-prob / response tokens
    model, tok = load_causal_lm(cfg.model, cfg.run.cache_dir, torch.device("cpu"))
    a = cfg.align.generate
    seqs = tokenize_pairs(tok, pairs, a.max_prompt_tokens + a.max_new_tokens, cfg.model.chat_template)
    with torch.no_grad():
        base = pair_forward(model.eval(), seqs, list(range(4)), tok.pad_token_id, "cpu").stats
    assert base.chosen_tokens.tolist() == [float(len(w[1])) for w, _ in seqs]
    expected = [math.log1p(math.exp(-(2.0 * (cw / nw - cl / nl) - 0.5)))
                for cw, cl, nw, nl in zip(*(t.tolist() for t in base.as_tuple()))]
    assert h1["loss"] == pytest.approx(sum(expected) / 4, abs=1e-4)

    assert res["finished"] and h2["loss"] < h1["loss"]


def test_early_stopping_on_held_out_pairs_returns_the_best_epochs_adapter(tiny_align_config, ray_session, tmp_path,
                                                                          dpo_pairs):
    """The held-out pairs (a quarter, drawn by the seed) prefer the other response: as training learns its
    pairs, val loss rises, so patience 1 stops after epoch 2 of 4 and epoch 1's adapter is returned, also when
    the run was interrupted after epoch 1 and resumed (best/ travels in every checkpoint)."""
    from sparserm.align.trainer import train_dpo
    from sparserm.train_state import held_out

    cfg = tiny_align_config("align.train.epochs=4", "align.train.lr=5e-3", "align.train.val_fraction=0.25",
                            "align.train.patience=1")
    _, val = held_out(len(dpo_pairs), 0.25, cfg.run.seed)
    pairs = [dict(p, chosen=p["rejected"], rejected=p["chosen"]) if i in val else p for i, p in enumerate(dpo_pairs)]
    first = train_dpo(cfg, pairs, storage_dir=tmp_path, name="es", stop_after_epoch=1, progress=False)
    assert Path(first["adapter"]).name == "best" and first["best_epoch"] == 1 and not first["finished"]
    epoch1 = load_file(str(Path(first["adapter"]) / "adapter_model.safetensors"))
    last1 = load_file(str(Path(first["adapter"]).parent / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(epoch1[k], last1[k]) for k in last1)  # epoch 1 is the best so far

    res = train_dpo(cfg, pairs, storage_dir=tmp_path, name="es", progress=False)
    h = res["history"]
    assert res["finished"] and [r["epoch"] for r in h] == [1, 2] and h[0] == first["history"][0]
    assert h[-1]["stopped_early_at"] == 2 and res["best_epoch"] == 1
    assert all(r["n_pairs"] == 6 and r["n_val"] == 2 and 0 <= r["val_reward_accuracy"] <= 1 for r in h)
    assert h[1]["val_loss"] > h[0]["val_loss"] and h[1]["loss"] < h[0]["loss"]
    best = load_file(str(Path(res["adapter"]) / "adapter_model.safetensors"))
    last = load_file(str(Path(res["adapter"]).parent / "adapter" / "adapter_model.safetensors"))
    assert Path(res["adapter"]).name == "best" and sorted(best) == sorted(epoch1)
    assert all(torch.equal(best[k], epoch1[k]) for k in best)  # the best epoch's adapter, not the last one's
    assert any(not torch.equal(best[k], last[k]) for k in best)


def test_validation_settings_stay_out_of_the_keys_at_their_defaults(tiny_align_config, dpo_pairs, tmp_path):
    """Keys of runs made before validation existed still match; a share of 0.5 or more, or patience without
    held-out pairs, is refused before any work."""
    from sparserm.align.rounds import PLACEMENT, _without
    from sparserm.align.trainer import dpo_key, train_dpo
    from sparserm.config import ConfigError, to_dict

    cfg = tiny_align_config()
    assert not {"val_fraction", "patience"} & set(dpo_key(cfg, dpo_pairs, None)["train"])
    assert "patience" not in _without(to_dict(cfg.reward), PLACEMENT)  # the reward model's key (`align`)
    on = dpo_key(tiny_align_config("align.train.val_fraction=0.25", "align.train.patience=1"), dpo_pairs, None)
    assert (on["train"]["val_fraction"], on["train"]["patience"]) == (0.25, 1)
    with pytest.raises(ConfigError, match="val_fraction"):
        tiny_align_config("align.train.val_fraction=0.5")
    with pytest.raises(ValueError, match="needs align.train.val_fraction"):
        train_dpo(tiny_align_config("align.train.patience=2"), dpo_pairs, storage_dir=tmp_path, name="x")
