"""The steered chat service through the official ``openai`` client against the running app on the tiny model:
completions streamed and not, ``/v1/models``, the ``steering`` object, stop strings, budgets, choices and seeds,
``serve all``'s reward model beside it, and the answers equal to ``SteeredGenerator`` in this process."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from tests.serve.conftest import ASK, JOKE

STRONG = {"alpha": 3.0, "k_diff": 40}  # moves enough latents that the tiny model's text changes
# the random tiny model's greedy text is one token repeated; seeded sampling gives text of many different tokens
SAMPLED = {"temperature": 1.0, "seed": 2, "max_tokens": 12}


@pytest.fixture(scope="module")
def gen(steer_service):
    """The same map in this process, on one thread as a replica runs it (the same float sums, the same argmax)."""
    from sparserm.steering.generate import SteeredGenerator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield SteeredGenerator.load(steer_service["map_dir"], device="cpu")
    torch.set_num_threads(threads)


def chat(steer_client, messages=ASK, steering=None, **kw):
    kw.setdefault("temperature", 0.0)
    extra = {"steering": steering} if steering is not None else None
    return steer_client.chat.completions.create(model="map", messages=messages, extra_body=extra, **kw)


def stream(steer_client, messages=ASK, steering=None, **kw):
    chunks = list(chat(steer_client, messages, steering, stream=True, **kw))
    texts: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    return chunks, texts


def test_models_health_and_serve_all(steer_service, steer_client, tiny_model_dir):
    models = steer_client.models.list().data
    assert [m.id for m in models] == ["map"] and models[0].owned_by == "sparserm"
    assert models[0].root == str(tiny_model_dir)  # the backbone the map steers
    r = requests.get(steer_service["url"] + "/healthz", timeout=30)  # open even with auth on
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": "map"}
    # `serve all` put the reward model beside the chat app, on the same proxy, with the same token
    r = requests.post(steer_service["rm_url"] + "/v1/score", json={"items": [{"prompt": "p", "response": "r"}]},
                      headers={"Authorization": f"Bearer {steer_service['token']}"}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "tiny-random-rm" and len(r.json()["scores"]) == 1


def test_completion_is_the_generators_output(steer_client, gen):
    out = chat(steer_client, steering={"enabled": False})
    want = gen.generate([ASK], [None], gen.sampling(temperature=0.0))[0]
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.model == "map" and choice.message.role == "assistant"
    assert choice.message.content == want.text and out.usage.completion_tokens == want.n_tokens
    assert choice.finish_reason == ("stop" if want.finished else "length")
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens > want.n_tokens
    assert out.steering == {"enabled": False, "alpha": 0.2, "mode": "add", "k_prompt": 8, "k_diff": 6, "latents": [],
                            "edited_tokens": 0, "edited_latents": 0, "edited_latent_ids": [], "latent_edits": 0,
                            "choices": [{"index": 0, "edited_tokens": 0, "edited_latents": 0, "edited_latent_ids": [],
                                         "latent_edits": 0}]}
    for kw, sampling, seed in (({}, gen.sampling(temperature=0.0), 0),
                               (SAMPLED, gen.sampling(temperature=1.0, max_new_tokens=12), SAMPLED["seed"])):
        steered = chat(steer_client, JOKE, steering=STRONG, **kw)
        want = gen.generate([JOKE], [gen.settings(**STRONG)], sampling, seed=seed)[0]
        assert steered.choices[0].message.content == want.text and steered.usage.completion_tokens == want.n_tokens
        assert steered.steering["latents"] == want.steering["latents"]
        counts = ("edited_tokens", "edited_latents", "edited_latent_ids", "latent_edits")
        assert {k: steered.steering[k] for k in counts} == {k: want.steering[k] for k in counts}


def test_alpha_zero_is_the_unsteered_text_and_steering_changes_it(steer_client):
    for messages, kw in ((ASK, {}), (JOKE, {}), (JOKE, SAMPLED), (ASK, SAMPLED)):
        plain = chat(steer_client, messages, steering={"enabled": False}, **kw)
        zero = chat(steer_client, messages, steering={"alpha": 0.0}, **kw)
        assert zero.choices[0].message.content == plain.choices[0].message.content
        assert zero.usage == plain.usage
        assert zero.steering["enabled"] and zero.steering["latents"] and zero.steering["edited_tokens"] == 0
        strong = chat(steer_client, messages, steering=STRONG, **kw)
        s = strong.steering
        assert s["edited_tokens"] > 0 and s["edited_latents"] > 0 and s["latent_edits"] >= s["edited_tokens"]
        assert s["alpha"] == 3.0 and s["k_diff"] == 40 and s["k_prompt"] == 8  # unset fields: the map's
        assert strong.choices[0].message.content != plain.choices[0].message.content
    assert len(plain.choices[0].message.content) > 5  # the sampled texts compared are not empty
    default = chat(steer_client)  # no steering object: the map's settings (alpha 0.2, add)
    assert default.steering["enabled"] and (default.steering["alpha"], default.steering["mode"]) == (0.2, "add")
    ablate = chat(steer_client, JOKE, steering={"mode": "ablate", "k_diff": 40})
    assert ablate.steering["mode"] == "ablate" and ablate.steering["enabled"]


def test_streaming_joins_to_the_completion(steer_client):
    for steering, kw in (({"enabled": False}, SAMPLED), (STRONG, SAMPLED), (STRONG, {})):
        whole = chat(steer_client, JOKE, steering, **kw)
        chunks, texts = stream(steer_client, JOKE, steering, stream_options={"include_usage": True}, **kw)
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert texts == {0: whole.choices[0].message.content}
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
        assert finals[0].steering == whole.steering
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        if kw:
            assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # text came in pieces


def test_raw_event_stream(steer_service):
    r = requests.post(steer_service["url"] + "/v1/chat/completions", timeout=60, stream=True,
                      headers={"Authorization": f"Bearer {steer_service['token']}"},
                      json={"messages": ASK, "stream": True, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings_and_token_budget(steer_client, gen):
    import re

    plain = chat(steer_client, JOKE, steering={"enabled": False}, **SAMPLED).choices[0].message.content
    stop = re.findall(r"[A-Za-z]{2}", plain[2:])[0]  # whole characters from inside the text
    head = plain[: plain.index(stop)].strip()
    out = chat(steer_client, JOKE, steering={"enabled": False}, stop=[stop, "never-said"], **SAMPLED)
    assert out.choices[0].message.content == head and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 12
    assert stream(steer_client, JOKE, {"enabled": False}, stop=stop, **SAMPLED)[1] == {0: head}
    cut = chat(steer_client, JOKE, steering={"enabled": False}, **{**SAMPLED, "max_tokens": 9}, max_completion_tokens=3)
    assert cut.usage.completion_tokens == 3 and cut.choices[0].finish_reason == "length"
    want = gen.generate([JOKE], [None], gen.sampling(temperature=1.0, max_new_tokens=3), seed=SAMPLED["seed"])[0]
    assert cut.choices[0].message.content == want.text


def test_choices_and_seeds(steer_client):
    kw = dict(messages=JOKE, n=3, temperature=1.5, seed=7, max_tokens=8, steering={"alpha": 0.5})
    a, b = chat(steer_client, **kw), chat(steer_client, **kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1  # sampled choices differ; the seed repeats them
    assert [e["index"] for e in a.steering["choices"]] == [0, 1, 2]
    per_choice = a.steering["choices"]
    assert a.steering["edited_tokens"] == sum(e["edited_tokens"] for e in per_choice)
    union = sorted(set().union(*(e["edited_latent_ids"] for e in per_choice)))  # the response's latents: all choices'
    assert all(e["edited_latents"] == len(e["edited_latent_ids"]) for e in per_choice)
    assert a.steering["edited_latent_ids"] == union and a.steering["edited_latents"] == len(union) > 0
    assert set(union) <= set(a.steering["latents"])
    assert a.usage.completion_tokens <= 3 * 8
    _, streamed = stream(steer_client, **kw)
    assert streamed == dict(enumerate(texts))


def test_concurrent_requests_get_what_they_get_alone(steer_client):
    asks = [(ASK, {"alpha": 2.0}), (JOKE, {"alpha": 1.0, "mode": "ablate", "k_diff": 3}), (JOKE, STRONG),
            (ASK, {"enabled": False})]  # greedy: these share batches
    alone = [chat(steer_client, m, s) for m, s in asks]
    with ThreadPoolExecutor(len(asks) * 2) as pool:
        together = list(pool.map(lambda ms: chat(steer_client, *ms), asks * 2))
    for i, out in enumerate(together):
        want = alone[i % len(asks)]
        assert out.choices[0].message.content == want.choices[0].message.content and out.steering == want.steering
