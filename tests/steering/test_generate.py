"""Steered decoding through transformers generation on the tiny model and the session's map."""
import pytest
import torch
from torch.testing import assert_close

from sparserm.steering.generate import SteeredGenerator
from sparserm.steering.vector import SteerSettings

CONVERSATIONS = [[{"role": "user", "content": "How do I bake bread?"}],
                 [{"role": "user", "content": "Tell me a joke about the capital of France, please, a long one."}],
                 [{"role": "user", "content": "Hi"}]]


@pytest.fixture(scope="module")
def gen(steer_map):
    torch.manual_seed(0)
    return SteeredGenerator.load(steer_map, device="cpu")


def plain_greedy(gen, conversations):
    """``model.generate`` with no hook at all, on the same left-padded batch."""
    from sparserm.align.engines.base import render_prompts
    from sparserm.align.engines.base import left_pad

    s = gen.sampling(temperature=0.0)
    prompts = render_prompts(gen.tokenizer, conversations, s.max_prompt_tokens, True)
    ids, mask = left_pad(prompts, gen.tokenizer.pad_token_id)
    with torch.no_grad():
        out = gen.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=s.max_new_tokens,
                                 pad_token_id=gen.tokenizer.pad_token_id)
    eos = gen.tokenizer.eos_token_id
    return [row[: row.index(eos)] if eos in row else row for row in out[:, ids.shape[1]:].tolist()]


def test_alpha_zero_is_token_for_token_the_unsteered_generation(gen):
    greedy = gen.sampling(temperature=0.0)
    out = gen.generate(CONVERSATIONS, [gen.settings(alpha=0.0)] * 3, greedy)
    assert [o.token_ids for o in out] == plain_greedy(gen, CONVERSATIONS)
    assert all(o.steering["latents"] and o.steering["edited_tokens"] == 0 for o in out)  # selected, never moved
    off = gen.generate(CONVERSATIONS, [None, gen.settings(enabled=False), None], greedy)
    assert [o.token_ids for o in off] == plain_greedy(gen, CONVERSATIONS) and all(o.steering is None for o in off)


@pytest.mark.parametrize("mode", ["add", "ablate"])
def test_only_active_selected_latents_change_and_the_residual_moves_by_the_decoded_change(gen, mode):
    sae = gen.hook.output_sae
    # k_diff 40: enough selected latents of both signs that some are active at the generated tokens
    out, trace = gen.generate(CONVERSATIONS, [gen.settings(alpha=0.5, mode=mode, k_diff=40)] * 3,
                              gen.sampling(temperature=0.0), trace=True)
    edited = 0
    for step in trace:
        a, a2 = step["a"], step["a_edited"]
        allowed = torch.zeros_like(a, dtype=torch.bool)
        for j, b in enumerate(step["rows"]):
            v = out[b].steering
            sel = torch.tensor(v["latents"])
            score = torch.tensor(v["scores"])
            allowed[j, sel] = a[j, sel] > 0
            if mode == "ablate":
                allowed[j, sel[score >= 0]] = False
            if mode == "add":  # every active selected latent moved by alpha x max(a) x sign(s)
                want = a[j, sel] + 0.5 * a[j].max() * torch.sign(score)
                assert_close(a2[j, sel][a[j, sel] > 0], want[a[j, sel] > 0])
            else:
                assert torch.all(a2[j, sel[score < 0]] == 0)
        changed = a2 != a
        assert not (changed & ~allowed).any()  # nothing outside the active selected latents
        assert torch.equal(changed, allowed)  # and every one of them
        edited += int(changed.any(-1).sum())
        moved = changed.any(-1)
        delta = torch.zeros_like(step["h"])
        if moved.any():
            delta[moved] = sae.decode(a2[moved]) - sae.decode(a[moved])
        assert_close(step["h_edited"] - step["h"], delta)
        assert torch.equal(step["h_edited"][~moved], step["h"][~moved])  # untouched rows bit for bit
    assert edited > 0
    assert sum(o.steering["edited_tokens"] for o in out) > 0


def test_a_request_steered_in_a_batch_equals_it_alone(gen):
    greedy = gen.sampling(temperature=0.0)
    settings = [gen.settings(alpha=2.0), gen.settings(alpha=1.0, mode="ablate", k_diff=3), gen.settings(alpha=3.0)]
    batch = gen.generate(CONVERSATIONS, settings, greedy)
    alone = [gen.generate([c], [s], greedy)[0] for c, s in zip(CONVERSATIONS, settings)]
    for b, a in zip(batch, alone):
        assert b.token_ids == a.token_ids and b.steering == a.steering
    assert len(batch[1].steering["latents"]) <= 3
    # a row not steered inside a steered batch is the unsteered generation
    mixed = gen.generate(CONVERSATIONS, [settings[0], None, settings[2]], greedy)
    assert mixed[1].token_ids == plain_greedy(gen, [CONVERSATIONS[1]])[0]
    assert [mixed[0].token_ids, mixed[2].token_ids] == [batch[0].token_ids, batch[2].token_ids]
    assert any(o.token_ids != p for o, p in zip(batch, plain_greedy(gen, CONVERSATIONS)))  # steering did something


def test_counts_cover_only_each_rows_own_tokens(gen):
    out = gen.generate(CONVERSATIONS, [gen.settings(alpha=0.5)] * 3, gen.sampling(temperature=0.0))
    for o in out:
        s = o.steering
        steps = o.n_tokens + 1 if o.finished else o.n_tokens  # the forward that emitted EOS is the row's too
        assert 0 < s["edited_tokens"] <= steps and s["edited_latents"] <= len(s["latents"])
        assert s["edited_tokens"] <= s["latent_edits"] <= steps * len(s["latents"])


def test_bad_settings_are_refused(gen):
    with pytest.raises(ValueError, match="unknown"):
        gen.generate(CONVERSATIONS[:1], [SteerSettings(alpha=0.1, mode="boost", k_prompt=4, k_diff=4)])
