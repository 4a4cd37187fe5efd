"""veRL's reward loop pointed at the service unchanged: ``POST /classify`` as veRL calls a vLLM-served discriminative
reward model, scored exactly as ``/v1/score`` scores the same prompt and response."""
from __future__ import annotations

import math

import pytest

from tests.serve.test_http import PROMPTS, RESPONSES, post


def verl_rm_input(tok, prompt_messages: list[dict], response: str) -> str:
    """The text veRL's ``RewardLoopWorker._preprocess_reward_inputs`` (verl/experimental/reward_loop/reward_loop.py,
    verl-project/verl at 1dda039b9c63, Aug 2026) builds: the decoded rollout without eos, appended to the raw prompt
    as an assistant turn, the whole chat through the RM tokenizer's template without a generation prompt, the
    leading BOS cut."""
    chat = list(prompt_messages) + [{"role": "assistant", "content": response.replace(tok.eos_token, "")}]
    text = tok.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    if tok.bos_token is not None and text.startswith(tok.bos_token):
        text = text[len(tok.bos_token):]
    return text


def verl_classify(url: str, model: str, text: str, **legacy) -> float:
    """``RewardLoopWorker.compute_score_disrm`` (same file) for ``reward_model.rollout.name == "vllm"``: POST
    ``{"model", "input", "use_activation": False}`` to ``http://{router}/classify`` with aiohttp, no headers,
    ``raise_for_status``; the reward is ``output["data"][-1]["probs"][-1]``. (Before 2026 veRL sent
    ``"activation": False``, vLLM < 0.11.2's name; ``legacy`` replaces the flag to check that shape too.)"""
    import asyncio

    import aiohttp

    payload = {"model": model, "input": text, **(legacy or {"use_activation": False})}

    async def call():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            async with session.post(f"{url}/classify", json=payload) as resp:
                resp.raise_for_status()
                return await resp.json()

    return asyncio.run(call())["data"][-1]["probs"][-1]


def test_verl_reward_loop_classify(service, rm):
    from sparserm.model.text import to_messages

    tok = rm.backbone.tokenizer
    expected = rm.score(PROMPTS, RESPONSES)
    texts = [verl_rm_input(tok, to_messages(p), r + tok.eos_token) for p, r in zip(PROMPTS, RESPONSES)]
    assert not texts[0].startswith(tok.bos_token)  # the tiny tokenizer's BOS opens its template, as SmolLM2's does
    got = [verl_classify(service["url"], "/models/reward", t) for t in texts]
    assert got == pytest.approx(expected, abs=1e-5)
    assert verl_classify(service["url"], "rm", texts[0], activation=False) == pytest.approx(expected[0], abs=1e-5)


def test_classify_shape_and_activation(service, rm):
    """vLLM's ClassificationResponse; unset use_activation gives the sigmoid (vLLM's one-label default); a list of
    inputs is scored as a batch; without add_special_tokens the cut BOS is not restored."""
    from sparserm.model.text import prompt_text, to_messages

    tok = rm.backbone.tokenizer
    texts = [verl_rm_input(tok, to_messages(p), r) for p, r in zip(PROMPTS, RESPONSES)]
    expected = rm.score(PROMPTS, RESPONSES)
    r = post(service["url"], "/classify", {"model": "m", "input": texts})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "list" and out["id"].startswith("classify-") and out["model"] == "tiny-random-rm"
    assert [d["index"] for d in out["data"]] == [0, 1, 2] and all(d["num_classes"] == 1 for d in out["data"])
    assert [d["probs"][0] for d in out["data"]] == pytest.approx([1 / (1 + math.exp(-s)) for s in expected], abs=1e-6)
    # tokens scored: the templated prompt (its BOS back) and the response, without the closing turn end
    n_tokens = sum(len(tok(text, add_special_tokens=False)["input_ids"])
                   for p, r in zip(PROMPTS, RESPONSES) for text in (prompt_text(tok, p, True), r))
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] == n_tokens
    raw = post(service["url"], "/classify", {"input": texts[0], "use_activation": False,
                                             "add_special_tokens": False}).json()["data"][0]["probs"][0]
    same = post(service["url"], "/get_reward", {"query": [texts[0]]}).json()["rewards"][0]
    assert raw == pytest.approx(same, abs=1e-6)  # the same rule as OpenRLHF's route, BOS left cut


def test_classify_errors(service):
    assert post(service["url"], "/classify", {"input": 3}).status_code == 422
    assert post(service["url"], "/classify", {"model": "m"}).json()["field"] == "input"
    assert post(service["url"], "/classify", {"input": ["a"] * 9}).json()["field"] == "input"  # max 8 items
