"""FPO and TDPO-2 in the one preference trainer (LoRA, DeepSpeed on Ray Train, CPU): FPO's cached reference
gives the loss the online reference gives, and training with the cache runs no reference model at all;
TDPO-2 runs its reference online at every step (adapter off, or a second frozen copy)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparserm.testing import build_tiny_sae

LAYER = 2


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    return str(build_tiny_sae(tmp_path_factory.mktemp("fpo-sae"), d_in=64, width=128, layer=LAYER))


@pytest.fixture(scope="module")
def fpo_cfg(tiny_align_config, sae_dir):
    def make(*extra):
        return tiny_align_config("align.loss.name=fpo", f"align.loss.fpo_sae_dir={sae_dir}", "align.loss.fpo_k=8",
                                 "align.train.epochs=2", "align.train.lr=5e-3", "align.reference_cache.batch_size=2",
                                 *extra)
    return make


def _perturbed_policy(cfg, seed: int = 3):
    """The tiny model with a LoRA adapter whose B matrices are random: a policy unlike its base."""
    from peft import LoraConfig, get_peft_model

    from sparserm.model.backbone import load_causal_lm

    model, tok = load_causal_lm(cfg.model, cfg.run.cache_dir, torch.device("cpu"))
    torch.manual_seed(seed)
    lora = cfg.align.train.lora
    peft = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules)))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return peft.eval(), tok


@pytest.mark.parametrize("index_set", ["union", "policy"])
def test_cached_fpo_loss_equals_the_online_one(fpo_cfg, ray_session, tmp_path, dpo_pairs, sae_dir, index_set):
    from sparserm.align.objectives import get_objective
    from sparserm.align.pair_forward import PairForward, pair_forward, tokenize_pairs
    from sparserm.fpo.reference_cache import build_reference_cache, cache_key, load_reference_cache
    from sparserm.sae.autoencoder import SparseAutoencoder

    cfg = fpo_cfg(f"align.loss.fpo_index_set={index_set}")
    pairs = dpo_pairs[:6]
    folder = build_reference_cache(cfg, pairs, tmp_path / "cache", sae_dir=sae_dir, layer=LAYER, progress=False)
    cache = load_reference_cache(folder, cache_key(cfg, pairs, None, sae_dir, LAYER))
    policy, tok = _perturbed_policy(cfg)
    sae = SparseAutoencoder.load(sae_dir)
    g = cfg.align.generate
    seqs = tokenize_pairs(tok, pairs, g.max_prompt_tokens + g.max_new_tokens, cfg.model.chat_template)
    fpo = get_objective("fpo")
    idx = list(range(6))
    pol = pair_forward(policy, seqs, idx, tok.pad_token_id, "cpu", frozenset({"features"}), sae, LAYER)
    with torch.no_grad(), policy.disable_adapter():  # the reference online: the base, as FPO's public code runs it
        online = pair_forward(policy, seqs, idx, tok.pad_token_id, "cpu", frozenset({"features"}), sae, LAYER)
    cached = PairForward(cache.stats.select(idx).to("cpu", torch.float32), chosen_features=cache.features(idx, "chosen"),
                         rejected_features=cache.features(idx, "rejected"))
    loss_online, u_online = fpo.loss(pol, online, cfg.align.loss)
    loss_cached, u_cached = fpo.loss(pol, cached, cfg.align.loss)
    assert u_online.abs().min() > 1e-4  # a real margin: the policy is not its reference
    torch.testing.assert_close(loss_cached, loss_online, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u_cached, u_online, rtol=1e-5, atol=1e-6)


def test_fpo_trains_from_the_cache_without_a_reference_model(fpo_cfg, ray_session, tmp_path, dpo_pairs):
    from sparserm.align.trainer import train_dpo

    cfg = fpo_cfg()
    pairs = dpo_pairs[:4]
    first = train_dpo(cfg, pairs, storage_dir=tmp_path, name="fpo", stop_after_epoch=1, progress=False)
    h1 = first["history"][0]
    assert h1["objective"] == "fpo" and h1["reference_kind"] == "features"
    # no reference forward before or during the steps, no second model, and the trained weights ran exactly
    # once per policy micro-batch (an adapter-disabled reference forward would add one per micro-batch)
    assert h1["reference_forwards"] == 0 and h1["reference_forwards_in_steps"] == 0 and not h1["reference_copy"]
    assert h1["model_forwards_in_steps"] == h1["policy_micro_batches"] == 2
    # at step 0 the policy is its reference (fresh adapter, LoRA B = 0): features and log-probs agree, u = 0
    assert h1["u_abs_max_before_first_step"] < 1e-5
    cache = tmp_path / "fpo" / "reference_cache"
    assert (cache / "reference.parquet").is_file() and (cache / "manifest.json").is_file()
    stamp = (cache / "manifest.json").stat().st_mtime_ns
    resumed = train_dpo(cfg, pairs, storage_dir=tmp_path, name="fpo", progress=False)
    assert resumed["finished"] and resumed["history"][0] == h1  # epoch 1 not redone
    assert (cache / "manifest.json").stat().st_mtime_ns == stamp  # the matching cache was reused, not rebuilt
    assert resumed["history"][1]["loss"] < h1["loss"]


def test_fpo_without_an_sae_is_refused_naming_the_key(tiny_align_config, ray_session, tmp_path, dpo_pairs):
    from sparserm.align.trainer import train_dpo

    cfg = tiny_align_config("align.loss.name=fpo")
    with pytest.raises(ValueError, match="align.loss.fpo_sae_dir"):
        train_dpo(cfg, dpo_pairs[:4], storage_dir=tmp_path, name="fpo", progress=False)


def test_tdpo2_runs_its_reference_online(tiny_align_config, ray_session, tmp_path, dpo_pairs):
    from sparserm.align.trainer import train_dpo

    cfg = tiny_align_config("align.loss.name=tdpo2", "align.train.epochs=1", "align.train.lr=5e-3")
    pairs = dpo_pairs[:4]
    first = train_dpo(cfg, pairs, storage_dir=tmp_path, name="t1", progress=False)
    h = first["history"][0]
    # round 1: the reference is the base, through the same weights with the adapter off, once per micro-batch
    assert h["reference_kind"] == "token" and not h["reference_copy"]
    assert h["reference_forwards_in_steps"] == h["policy_micro_batches"] == 2
    assert h["model_forwards_in_steps"] == 2 * h["policy_micro_batches"]
    assert h["u_abs_max_before_first_step"] < 1e-5  # same weights: margin and sequential KL are 0
    assert not (Path(first["adapter"]).parent / "reference.safetensors").exists()  # nothing stored: it is online
    # a later round starts from an adapter: its reference (base + that adapter) is a second frozen copy
    second = train_dpo(cfg, pairs, storage_dir=tmp_path, name="t2", init_adapter=first["adapter"], progress=False)
    h2 = second["history"][0]
    assert h2["reference_copy"] and h2["model_forwards_in_steps"] == h2["policy_micro_batches"]
    assert h2["u_abs_max_before_first_step"] < 1e-4  # the copy is the policy this round starts from


@pytest.mark.parametrize("loss,copy", [("fpo", False), ("tdpo2", True)])
def test_in_full_finetuning_only_tdpo_holds_a_second_copy(fpo_cfg, ray_session, tmp_path, dpo_pairs, loss, copy):
    """Full fine-tuning has no adapter to switch off: TDPO-2's online reference is a frozen copy of the
    weights, while FPO reads its cache and no second copy exists."""
    from sparserm.align.trainer import train_dpo

    cfg = fpo_cfg(f"align.loss.name={loss}", "align.train.finetune=full", "align.train.epochs=1",
                  "align.train.lr=1e-3")
    h = train_dpo(cfg, dpo_pairs[:4], storage_dir=tmp_path, name=loss, progress=False)["history"][0]
    assert h["reference_copy"] is copy and h["reference_forwards"] == 0
    assert h["model_forwards_in_steps"] == h["policy_micro_batches"] == 2  # the trained weights: policy only
    assert h["reference_forwards_in_steps"] == (2 if copy else 0)
    assert h["u_abs_max_before_first_step"] < 1e-5


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_key(fpo_cfg, dpo_pairs, sae_dir):
    """align.train.gradient_checkpointing recomputes blocks in the backward: FPO's hook on block L (which the
    recompute runs again) still gives the loss and LoRA gradients of the plain forward, and the run's key (what it
    computes) does not change."""
    from dataclasses import replace

    from sparserm.align.objectives import get_objective
    from sparserm.align.pair_forward import pair_forward, tokenize_pairs
    from sparserm.align.trainer import dpo_key
    from sparserm.sae.autoencoder import SparseAutoencoder

    cfg = fpo_cfg()
    pairs, idx = dpo_pairs[:4], [0, 1, 2, 3]
    sae = SparseAutoencoder.load(sae_dir)
    fpo, reference = get_objective("fpo"), None
    results = []
    for checkpointing in (False, True):
        policy, tok = _perturbed_policy(cfg)
        policy.train()
        if checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        g = cfg.align.generate
        seqs = tokenize_pairs(tok, pairs, g.max_prompt_tokens + g.max_new_tokens, cfg.model.chat_template)
        if reference is None:
            with torch.no_grad(), policy.disable_adapter():
                reference = pair_forward(policy, seqs, idx, tok.pad_token_id, "cpu", frozenset({"features"}), sae, LAYER)
        pol = pair_forward(policy, seqs, idx, tok.pad_token_id, "cpu", frozenset({"features"}), sae, LAYER)
        loss, _ = fpo.loss(pol, reference, cfg.align.loss)
        loss.mean().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        assert grads and all(g.abs().sum() > 0 for g in grads.values())
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0])
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-4, atol=1e-6)
    on = replace(cfg, align=replace(cfg.align, train=replace(cfg.align.train, gradient_checkpointing=True)))
    assert dpo_key(on, pairs, None) == dpo_key(cfg, pairs, None)
