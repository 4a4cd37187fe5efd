"""Tiny random models for tests and benchmarks (no files from anywhere, no network).

* ``build_tiny_model(path)``: a random Llama backbone with a small BPE tokenizer carrying a ChatML chat template.
* ``build_tiny_rm(out_dir, model_dir=None)``: a SparseRM folder over such a backbone (built here unless
  ``model_dir`` is given): random directions ``torch.randn(2K, d)`` and an untrained :class:`RewardHead`
  whose standardisation is fit on random data.
* ``build_tiny_sae(out_dir, d_in)``: a random sae-lens ReLU SAE folder (for FPO's feature constraint).
* ``tensorboard_scalars(folder)`` / ``mlflow_metrics(uri, log_dir)``: what a run logged (``sparserm.tracking``),
  read back by TensorBoard's and MLflow's own readers, as ``{tag: [(step, value), ...]}`` in step order.
"""
from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "How do I bake bread? Mix flour, water and yeast, then bake it.",
    "I won't help with that. Please ask something else.",
    "The capital of France is Paris. Paris is a city in Europe.",
    "Human: tell me a joke Assistant: why did the chicken cross the road?",
    "You should wait 24 hours before filing a missing person report; you can report at once.",
] * 20


def build_tiny_model(path: Path, n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    path.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def build_tiny_rm(out_dir: str | Path, model_dir: str | Path | None = None, *, layer: int = 2, top_k: int = 8,
                  head_hidden: int = 32, max_tokens: int = 128, seed: int = 0, **model_kwargs) -> Path:
    """Write a SparseRM folder to ``out_dir`` and return it (``model_kwargs`` go to :func:`build_tiny_model`)."""
    import json

    from sparserm.config import ModelConfig
    from sparserm.reward.head import RewardHead
    from sparserm.reward.model import save_rm

    out_dir = Path(out_dir)
    if model_dir is None:
        model_dir = build_tiny_model(out_dir.parent / f"{out_dir.name}-backbone", seed=seed, **model_kwargs)
    d = json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(2 * top_k, d, generator=g)
    head = RewardHead(2 * top_k, head_hidden)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    head.fit_standardization(torch.randn(64, 2 * top_k, generator=g) * 5.0)
    m = 8 * top_k
    mu_w, mu_l = torch.rand(m, generator=g), torch.rand(m, generator=g)
    cfg = ModelConfig(name=str(Path(model_dir).resolve()), layer=layer, max_tokens=max_tokens, device="cpu")
    return save_rm(out_dir, model_cfg=cfg, head=head.eval(), dirs=dirs, pos_ids=list(range(top_k)),
                   neg_ids=list(range(top_k, 2 * top_k)), mu_w=mu_w.numpy(), mu_l=mu_l.numpy(),
                   sae_info={"source": "random", "width": m}, extra={"name": "tiny-random-rm"})


def build_tiny_sae(out_dir: str | Path, d_in: int = 64, width: int = 128, layer: int = 2, seed: int = 0) -> Path:
    """A sae-lens StandardSAE (ReLU) with random weights, saved as a folder ``SparseAutoencoder.load`` reads.
    """
    import json

    from sae_lens import StandardSAE, StandardSAEConfig

    from sparserm.sae.autoencoder import META_FILE

    g = torch.Generator().manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=width))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, width, generator=g) / d_in ** 0.5)
        sae.W_dec.copy_(torch.randn(width, d_in, generator=g) / d_in ** 0.5)
        sae.b_enc.zero_()  # about half the latents fire on a token of the tiny random model
        sae.b_dec.zero_()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sae.save_model(out_dir)
    (out_dir / META_FILE).write_text(json.dumps({"source": "random", "layer": layer, "width": width}))
    return out_dir


def tensorboard_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``folder`` as TensorBoard shows them (an interrupted process's events
    purged by the next one's first step), by TensorBoard's ``EventAccumulator`` keeping every event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_metrics(uri: str, log_dir: str | Path, experiment: str = "sparserm") -> dict[str, list[tuple[int, float]]]:
    """Every metric history of the MLflow run that the tracker of ``log_dir`` logged to (``tracking.mlflow_uri``
    ``uri``), by ``MlflowClient.get_metric_history``."""
    from mlflow import MlflowClient

    from sparserm.manifest import stable_hash
    from sparserm.tracking import MLflow, mlflow_store

    client = MlflowClient(tracking_uri=mlflow_store(uri))
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    key = stable_hash(str(Path(log_dir).resolve()))
    (run,) = client.search_runs([exp_id], f"tags.`{MLflow.KEY}` = '{key}'")
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics}
