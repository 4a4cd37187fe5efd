"""What the preference trainer trains, by ``align.train.finetune``: a LoRA adapter (default) or every weight.

``FINETUNE[name]`` is an object with:

- ``check_init(init)``: refuses, on the driver before any work, a starting point it cannot continue;
- ``prepare(model, train_cfg, init, seed)``: the model to hand to DeepSpeed (LoRA: a new adapter, or the
  round's starting adapter ``init``, trainable; full: the model itself, every parameter trainable);
- ``restore(model, folder)``: the weights of a checkpoint folder back into it (on resume);
- ``save(engine, stage, folder, tok)``: this epoch's weights into a checkpoint folder (every rank calls it;
  under ZeRO-3 the partitioned parameters are gathered on every rank, and rank 0 writes);
- ``folder``: the checkpoint subfolder (``adapter`` or ``model``), and ``adapter_off(module)``: a context in
  which the module computes as the untuned base (LoRA: the adapter disabled; full: none exists, so
  ``None``: a reference other than the starting weights then needs a second copy), and ``can_switch_off``:
  whether ``adapter_off`` gives one.

Full fine-tuning starts from the base weights; ``init`` (a previous round's weights) is LoRA's only.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from sparserm.model.backbone import quiet_peft


def _gathered(model, stage: int):
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad])


class LoraWeights:
    name, folder, can_switch_off = "lora", "adapter", True

    def check_init(self, init: str | None) -> None:
        pass  # any saved adapter continues

    def prepare(self, model, t, init: str | None, seed: int):
        from peft import LoraConfig, PeftModel, get_peft_model

        with quiet_peft():
            if init:
                return PeftModel.from_pretrained(model, init, is_trainable=True)
            torch.manual_seed(seed)
            return get_peft_model(model, LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                                    target_modules=list(t.lora.target_modules), task_type="CAUSAL_LM"))

    def restore(self, model, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))

    def save(self, engine, stage: int, folder: Path, tok, rank: int) -> None:
        from peft import get_peft_model_state_dict

        with _gathered(engine.module, stage):
            state = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(engine.module).items()}
        if rank == 0:
            engine.module.save_pretrained(str(folder), state_dict=state)

    def adapter_off(self, module):
        return module.disable_adapter()


class FullWeights:
    name, folder, can_switch_off = "full", "model", False

    def check_init(self, init: str | None) -> None:
        if init:
            raise ValueError("align.train.finetune=full starts from the base weights: a starting adapter "
                             f"({init}) is LoRA's; use finetune=lora to continue one")

    def prepare(self, model, t, init: str | None, seed: int):
        self.check_init(init)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def restore(self, model, folder: Path) -> None:
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(str(folder), dtype=next(model.parameters()).dtype)
        model.load_state_dict(trained.state_dict())

    def save(self, engine, stage: int, folder: Path, tok, rank: int) -> None:
        with _gathered(engine.module, stage):
            state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
        if rank == 0:
            engine.module.save_pretrained(str(folder), state_dict=state)  # safetensors, with config.json
            tok.save_pretrained(str(folder))  # a model folder `model.name` can point at

    def adapter_off(self, module):
        return None


FINETUNE = {w.name: w for w in (LoraWeights(), FullWeights())}
