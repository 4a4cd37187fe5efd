import pytest
import torch

from sparserm.config import ModelConfig
from sparserm.model.backbone import BackboneError, load_backbone, load_causal_lm
from sparserm.model.forward import batch_states, group_states, pool
from sparserm.model.text import encode_group, to_messages, truncate_group


def test_to_messages_parses_hh_dialogue():
    msgs = to_messages("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bake bread?\n\nAssistant:")
    assert msgs == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bake bread?"}]
    assert to_messages("What is 2+2?") == [{"role": "user", "content": "What is 2+2?"}]


def test_truncate_group_cuts_prompt_first_and_keeps_bos():
    g = truncate_group([1, 2, 3, 4, 5, 6], [[10, 11], [20, 21, 22]], max_tokens=6, keep_first=1)
    assert g.prefix == [1, 5, 6] and g.suffixes == [[10, 11], [20, 21, 22]]
    assert max(len(g.sequence(i)) for i in range(2)) == 6
    # a response longer than the budget loses its own beginning; the prompt only keeps its BOS
    g = truncate_group([1, 2, 3], [list(range(100, 110))], max_tokens=5, keep_first=1)
    assert g.prefix == [1] and g.suffixes == [[106, 107, 108, 109]]


def test_pooling_modes():
    states = torch.arange(12.0).view(4, 3)
    assert torch.equal(pool(states, 2, "last"), states[3])
    assert torch.equal(pool(states, 2, "mean_response"), states[2:].mean(0))
    assert torch.equal(pool(states, 2, "mean"), states.mean(0))
    with pytest.raises(ValueError, match="pooling"):
        pool(states, 2, "max")


@pytest.fixture(scope="module")
def tiny_backbone(tiny_model_dir, cache_dir):
    return load_backbone(ModelConfig(name=str(tiny_model_dir), layer=2, extra_layers=(0,)), cache_dir)


def test_truncated_backbone_matches_full_model(tiny_backbone, tiny_model_dir, cache_dir):
    assert tiny_backbone.n_layers_run == 3 and tiny_backbone.n_layers_total == 4
    full, tok = load_causal_lm(ModelConfig(name=str(tiny_model_dir)), cache_dir)
    group = encode_group(tok, "How do I bake bread?", ["Mix flour and water."], 64)
    ids = group.sequence(0)
    with torch.no_grad():
        ref = full(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    got = group_states(tiny_backbone, group)[0]
    assert torch.allclose(got.states[2], ref[3][0], atol=1e-5)
    assert torch.allclose(got.states[0], ref[1][0], atol=1e-5)


def test_prefix_sharing_equals_unshared_and_batched(tiny_backbone):
    tok = tiny_backbone.tokenizer
    group = encode_group(tok, "\n\nHuman: tell me a joke\n\nAssistant:", ["why did the chicken", "I won't help."], 64)
    assert len(group.prefix) > 0 and group.n_tokens_shared < group.n_tokens_total
    shared = group_states(tiny_backbone, group, share_prefix=True)
    unshared = group_states(tiny_backbone, group, share_prefix=False)
    batched = batch_states(tiny_backbone, [group.sequence(0), group.sequence(1)])
    for s, u, b in zip(shared, unshared, batched):
        assert s.token_ids == u.token_ids
        for layer in (0, 2):
            assert torch.allclose(s.states[layer], u.states[layer], atol=1e-4)
            assert torch.allclose(b[layer], u.states[layer], atol=1e-4)


def test_last_pooling_lands_on_the_response_not_the_template(tiny_backbone):
    tok = tiny_backbone.tokenizer
    group = encode_group(tok, "What is the capital of France?", ["Paris"], 64)
    text = group_states(tiny_backbone, group)[0]
    assert tok.decode(text.token_ids[-1:]).strip() != ""
    assert tok.decode(text.token_ids).endswith("Paris")
    assert text.response_start == len(group.prefix)
    assert torch.equal(text.pooled(2, "last"), text.states[2][-1])


def test_bad_model_names_are_named_in_errors(tmp_path, tiny_model_dir, cache_dir):
    with pytest.raises(BackboneError, match="missing.gguf"):
        load_backbone(ModelConfig(name=str(tmp_path / "missing.gguf")), cache_dir)
    with pytest.raises(BackboneError, match="not/a/valid/id"):
        load_backbone(ModelConfig(name="not/a/valid/id"), cache_dir)
    with pytest.raises(BackboneError, match="out of range"):
        load_backbone(ModelConfig(name=str(tiny_model_dir), layer=9), cache_dir)
