"""Response log-probs: the batched path equals a direct computation, and the shared-prompt path equals both."""
import pytest
import torch

from sparserm.align.logprobs import encode_batch, group_logprobs, response_logprobs
from sparserm.model.text import TokenGroup


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def direct(lm, prompt, resp):
    ids = torch.tensor([prompt + resp])
    logp = torch.log_softmax(lm(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(prompt) + j - 1, t].item() for j, t in enumerate(resp))


def test_batched_logprobs_equal_direct_computation(lm):
    rows = [([5, 6, 7, 8], [9, 10]), ([5, 6], [11, 12, 13, 14]), ([3, 4, 5, 6, 7, 8, 9], [20])]
    batch = encode_batch(rows, pad_id=0)
    assert batch.input_ids.shape == (3, 8) and batch.n_response == 4
    assert batch.response_mask.sum(1).tolist() == [2, 4, 1]
    with torch.no_grad():
        lp, counts = response_logprobs(lm, batch)
        avg, counts_avg = response_logprobs(lm, batch, average=True)
    assert counts.tolist() == counts_avg.tolist() == [2.0, 4.0, 1.0]  # the response tokens of each row
    expected = [direct(lm, p, r) for p, r in rows]
    assert lp.tolist() == pytest.approx(expected, abs=1e-4)
    assert avg.tolist() == pytest.approx([e / len(r) for e, (_, r) in zip(expected, rows)], abs=1e-4)


def test_shared_prompt_equals_unshared(lm):
    group = TokenGroup(prefix=[1, 5, 6, 7], suffixes=[[9, 10, 11], [12], [13, 14]])
    lp, n = group_logprobs(lm, group)
    assert n.tolist() == [3, 1, 2]
    expected = [direct(lm, group.prefix, s) for s in group.suffixes]
    assert lp.tolist() == pytest.approx(expected, abs=1e-4)


def test_errors_name_the_problem(lm):
    with pytest.raises(ValueError, match="row 1 has an empty response"):
        encode_batch([([1], [2]), ([1], [])], pad_id=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        group_logprobs(lm, TokenGroup(prefix=[], suffixes=[[1]]))


def test_response_entropy_is_the_mean_entropy_at_the_positions_predicting_the_response(lm):
    from sparserm.align.logprobs import response_entropy

    prompt, resp = [1, 5, 6, 7], [9, 10, 11]
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=torch.tensor([prompt + resp])).logits[0].float(), -1)
        h = -(logp.exp() * logp).sum(-1)  # entropy at every position
        got = response_entropy(lm, TokenGroup(prefix=prompt, suffixes=[resp]))
        empty = response_entropy(lm, TokenGroup(prefix=prompt, suffixes=[[]]))
    assert got == pytest.approx(h[3:6].mean().item(), abs=1e-5)  # positions 3..5 predict tokens 4..6
    assert empty == pytest.approx(h[3].item(), abs=1e-5)
    assert 0 < got <= torch.log(torch.tensor(float(logp.shape[-1]))).item()


def test_chunked_token_logprobs_equal_full_logits_in_value_and_gradient(lm):
    from sparserm.align.logprobs import chunked_token_logprobs, token_logprobs

    torch.manual_seed(0)
    head = lm.get_output_embeddings()
    vocab = head.weight.shape[0]
    h = torch.randn(11, head.weight.shape[1], requires_grad=True)
    targets = torch.randint(0, vocab, (11,))
    g = torch.randn(11)
    full = token_logprobs(head(h), targets)
    (gh_full, gw_full) = torch.autograd.grad((full * g).sum(), (h, head.weight))
    chunked = chunked_token_logprobs(head, h, targets, vocab, chunk_elements=3 * vocab)  # 4 chunks: 3+3+3+2
    (gh, gw) = torch.autograd.grad((chunked * g).sum(), (h, head.weight))
    assert torch.allclose(chunked, full, atol=1e-5)
    assert torch.allclose(gh, gh_full, atol=1e-5) and torch.allclose(gw, gw_full, atol=1e-5)
    with torch.no_grad():  # no graph: plain chunks
        assert torch.allclose(chunked_token_logprobs(head, h, targets, vocab, vocab), full, atol=1e-5)


def test_forward_batch_without_full_logits_equals_the_full_path_with_gradients(lm):
    from sparserm.align.pair_forward import _FULL_LOGITS, forward_batch

    rows = [([5, 6, 7, 8], [9, 10]), ([5, 6], [11, 12, 13, 14]), ([3, 4, 5, 6, 7, 8, 9], [20])]
    batch = encode_batch(rows, pad_id=0)
    params = [p for p in lm.parameters()]
    lp, counts, tokens, _ = forward_batch(lm, batch)  # the chunked path
    grads = torch.autograd.grad(lp.sum(), params, allow_unused=True)
    lp_full, _, tokens_full, _ = forward_batch(lm, batch, frozenset({"token"}))  # full logits
    grads_full = torch.autograd.grad(lp_full.sum(), params, allow_unused=True)
    assert tokens is None and tokens_full is not None and lm not in _FULL_LOGITS
    assert counts.tolist() == [2.0, 4.0, 1.0]
    assert torch.allclose(lp, lp_full, atol=1e-5)
    assert lp.tolist() == pytest.approx([direct(lm, p, r) for p, r in rows], abs=1e-4)
    for a, b in zip(grads, grads_full):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-5))


def test_a_head_the_fast_path_does_not_reproduce_falls_back_to_full_logits(lm, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sparserm.align.pair_forward import _FULL_LOGITS, forward_batch

    scaled = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    def logit_scale(_module, _inputs, out):  # applied after the LM head, as Cohere's or Granite's
        out["logits"] = out.logits * 0.5
        return out

    scaled.register_forward_hook(logit_scale)
    rows = [([5, 6, 7, 8], [9, 10]), ([5, 6], [11, 12, 13, 14])]
    with torch.no_grad():
        want = [sum(torch.log_softmax(scaled(input_ids=torch.tensor([p + r])).logits[0], -1)[len(p) + j - 1, t].item()
                    for j, t in enumerate(r)) for p, r in rows]
        with pytest.warns(UserWarning, match="computing full logits"):
            lp, _, _, _ = forward_batch(scaled, encode_batch(rows, pad_id=0))
    assert scaled in _FULL_LOGITS and lp.tolist() == pytest.approx(want, abs=1e-4)
