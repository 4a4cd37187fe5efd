import pytest
import torch

from sparserm.config import ModelConfig
from sparserm.model.backbone import BackboneError, load_backbone, load_causal_lm
from sparserm.model.forward import _row_shape, group_states, packed_states, pool, token_batches, tree_mask
from sparserm.model.text import encode_group, to_messages, truncate_group


def test_to_messages_parses_hh_dialogue():
    msgs = to_messages("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bake bread?\n\nAssistant:")
    assert msgs == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bake bread?"}]
    assert to_messages("What is 2+2?") == [{"role": "user", "content": "What is 2+2?"}]
    # text before the first turn opens the first user turn (it was dropped: the model never saw it)
    assert to_messages("Summarize this chat:\n\nHuman: hi\n\nAssistant: hello\n\nHuman: ok?") == [
        {"role": "user", "content": "Summarize this chat:\n\nhi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "ok?"}]
    assert to_messages("Context\n\nAssistant: hello\n\nHuman: more") == [
        {"role": "user", "content": "Context"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"}]


def test_truncate_group_cuts_prompt_first_and_keeps_bos():
    g = truncate_group([1, 2, 3, 4, 5, 6], [[10, 11], [20, 21, 22]], max_tokens=6, keep_first=1)
    assert g.prefix == [1, 5, 6] and g.suffixes == [[10, 11], [20, 21, 22]]
    assert max(len(g.sequence(i)) for i in range(2)) == 6
    # a response longer than the budget loses its own beginning; the prompt only keeps its BOS
    g = truncate_group([1, 2, 3], [list(range(100, 110))], max_tokens=5, keep_first=1)
    assert g.prefix == [1] and g.suffixes == [[106, 107, 108, 109]]
    # with no BOS to keep (a template or a tokenizer without one), the prompt's last token stays: a log-prob of
    # the first response token needs a position before it (the prompt was cut to nothing)
    g = truncate_group([1, 2, 3], [list(range(100, 110)), [200, 201]], max_tokens=5, keep_first=0)
    assert g.prefix == [3] and g.suffixes == [[106, 107, 108, 109], [200, 201]]


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


def _separate(backbone, ids: list[int]) -> dict[int, torch.Tensor]:
    """The reference: one text alone, batch 1, no mask, no position ids."""
    with torch.no_grad():
        out = backbone.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return {layer: out.hidden_states[layer + 1][0] for layer in backbone.layers}


def test_packed_groups_equal_separate_passes(tiny_backbone):
    tok = tiny_backbone.tokenizer
    groups = [encode_group(tok, "\n\nHuman: tell me a joke\n\nAssistant:", ["why did the chicken", "I won't help."], 64),
              encode_group(tok, "What is 2+2?", ["4", "Four, of course: two and two make four.", "5"], 64),
              encode_group(tok, "Say hi", ["hi"], 64)]
    assert all(len(g.prefix) > 0 for g in groups) and groups[0].n_tokens_shared < groups[0].n_tokens_total
    # budget 1: one forward per group; 10,000: one forward, groups taken shortest first (order restored)
    for share in (True, False):
        assert sorted(range(3), key=lambda i: _row_shape(groups[i], share)[1]) != [0, 1, 2]
    for share, budget in ((True, None), (False, None), (True, 1), (True, 10_000), (False, 10_000)):
        packed = packed_states(tiny_backbone, groups, share_prefix=share, max_batch_tokens=budget)
        assert [len(p) for p in packed] == [2, 3, 1]
        for g, texts in zip(groups, packed):
            for j, text in enumerate(texts):
                assert text.token_ids == g.sequence(j) and text.response_start == len(g.prefix)
                ref = _separate(tiny_backbone, g.sequence(j))
                for layer in (0, 2):
                    assert text.states[layer].shape == ref[layer].shape
                    assert torch.allclose(text.states[layer], ref[layer], atol=1e-4)


def test_tree_mask_keeps_siblings_apart_and_pads_inert():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    m = tree_mask(seg, seg >= 0, torch.float32)[0, 0] == 0  # True where attention is allowed
    assert m[3].tolist() == [True, True, True, True, False, False]  # response 1 sees prompt and itself
    assert m[4].tolist() == [True, True, False, False, True, False]  # response 2 never sees response 1
    assert m[5].tolist() == [False] * 5 + [True] and not m[:5, 5].any()  # the pad is inert


def test_token_batches_respect_the_budget(tiny_backbone):
    tok = tiny_backbone.tokenizer
    groups = [encode_group(tok, "q" * n, ["a b c", "d e"], 64) for n in (5, 10, 40, 40, 80)]
    batches = token_batches(groups, 120)
    assert sum(batches, []) == list(range(5))
    for b in batches:
        assert len(b) == 1 or len(b) * max(groups[i].n_tokens_shared for i in b) <= 120


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
