"""Alignment-stage FLOPs: building a steering map against one DPO round on the same triples (DSPA claims up to
4.47x fewer). Counted, not timed: a forward costs about 2 x (weights it multiplies by) x tokens.

- Map build (``steer build``): one forward of the backbone cut after the output block over each triple, the prompt
  once and both responses packed after it (``n_prompt + n_chosen + n_rejected`` tokens), so
  ``2 P_L (n_p + n_c + n_r)`` with ``P_L`` the weights of blocks 0..L_out (no LM head); the input SAE's encode on
  the prompt tokens ``2 d m_in n_p`` and the output SAE's on the response tokens ``2 d m_out (n_c + n_r)``; and
  ``A = G^T D / N`` as a dense product, ``2 N m_in m_out``.
- One DPO round (``align.train``): chosen and rejected each run with their prompt (``2 n_p + n_c + n_r`` tokens a
  triple) through every block and the LM head (``P``: all blocks' weights plus the LM head's ``V x d``, tied or
  not); the policy's forward and backward ``3 x 2 P T`` per epoch (the usual 6 P T of training every weight;
  with LoRA the weight gradients of the frozen base are skipped, about ``2 x 2 P T``, reported as ``lora``), the
  reference's forward ``2 P T`` once (``align.train.reference_online: false``, this repo's default) or every
  epoch (``true``).
- SAE training (only where the embedded default trains its two SAEs here; registry SAEs come pretrained and a
  DSPA pipeline does not count them): ``3 x (2 d m + 2 d m)`` a training token, fwd + bwd of encode and decode.

Embedding lookups, norms, attention's score products and the softmax are left out on both sides (the same
shares of either), so the ratio is what the weights decide.
"""
from __future__ import annotations


def weight_counts(model) -> dict:
    """Per decoder block its weights, and the LM head's (``V x d``) of a transformers causal LM."""
    from sparserm.model.backbone import base_model, decoder_layers

    blocks = [sum(p.numel() for p in b.parameters()) for b in decoder_layers(base_model(model))]
    head = model.get_output_embeddings().weight
    return {"blocks": blocks, "lm_head": int(head.numel())}


def build_flops(weights: dict, output_layer: int, tokens: dict, d: int, m_in: int, m_out: int,
                n_triples: int) -> dict:
    p_l = sum(weights["blocks"][: output_layer + 1])
    n_p, n_r = tokens["n_prompt"], tokens["n_chosen"] + tokens["n_rejected"]
    parts = {"model": 2 * p_l * (n_p + n_r), "input_sae": 2 * d * m_in * n_p, "output_sae": 2 * d * m_out * n_r,
             "map": 2 * n_triples * m_in * m_out}
    return {**parts, "total": sum(parts.values()), "weights_to_output_layer": p_l}


def dpo_flops(weights: dict, tokens: dict, epochs: int, reference_online: bool) -> dict:
    p = sum(weights["blocks"]) + weights["lm_head"]
    t = 2 * tokens["n_prompt"] + tokens["n_chosen"] + tokens["n_rejected"]
    forward = 2 * p * t
    reference = forward * (epochs if reference_online else 1)
    return {"policy": 3 * forward * epochs, "reference": reference, "total": 3 * forward * epochs + reference,
            "lora_total": 2 * forward * epochs + reference, "weights": p, "tokens": t, "epochs": epochs}


def sae_training_flops(d: int, m: int, training_tokens: int) -> int:
    return 3 * (2 * d * m + 2 * d * m) * training_tokens


def compare(build: dict, dpo: dict) -> dict:
    """DPO's FLOPs over the build's (both counts), the figure DSPA's 4.47x is."""
    return {"dpo_over_build": dpo["total"] / build["total"], "dpo_lora_over_build": dpo["lora_total"] / build["total"]}
