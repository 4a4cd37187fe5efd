"""Every HTTP route against in-process scoring, the OpenRLHF schema, auth on/off and each error code."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from tests.serve.conftest import LIMITS

PROMPTS = ["How do I bake bread?", "\n\nHuman: tell me a joke\n\nAssistant: why?\n\nHuman: go on\n\nAssistant:",
           "The capital of France is"]
RESPONSES = [" Mix flour, water and yeast, then bake it.", " The chicken crossed the road.", " Paris."]


def post(url, path, body=None, data=None, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    return requests.post(url + path, json=body, data=data, headers=headers, timeout=60)


def test_healthz_and_openapi(service):
    for url in (service["url"], service["auth_url"]):  # the health check needs no token even with auth on
        r = requests.get(url + "/healthz", timeout=30)
        assert r.status_code == 200 and r.json() == {"status": "ok", "model": "tiny-random-rm"}
    spec = requests.get(service["url"] + "/openapi.json", timeout=30).json()
    assert {"/v1/score", "/v1/compare", "/get_reward", "/healthz"} <= set(spec["paths"])
    assert {"ScoreRequest", "CompareRequest", "RewardRequest", "ScoreResponse"} <= set(spec["components"]["schemas"])
    assert requests.get(service["url"] + "/docs", timeout=30).status_code == 200


def test_binds_loopback_only(service):
    """The HTTP proxy listens on 127.0.0.1 (the config default) and nowhere else."""
    port = f"{service['cfg'].port:04X}"
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if Path(table).is_file():
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and local.endswith(":" + port):  # 0A: LISTEN
                    listening.append(local.split(":")[0])
    assert service["cfg"].host == "127.0.0.1" and listening == ["0100007F"]


def test_score_equals_in_process(service, rm):
    items = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)]
    r = post(service["url"], "/v1/score", {"items": items})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "tiny-random-rm" and out["truncated"] == []
    assert out["scores"] == pytest.approx(rm.score(PROMPTS, RESPONSES), abs=1e-5)
    # a chat-message prompt of one user turn is the same text as the plain prompt
    r = post(service["url"], "/v1/score", {"items": [{"prompt": [{"role": "user", "content": PROMPTS[0]}],
                                                      "response": RESPONSES[0]}]})
    assert r.json()["scores"] == pytest.approx(rm.score(PROMPTS[:1], RESPONSES[:1]), abs=1e-5)
    assert post(service["url"], "/v1/score", {"items": []}).json()["scores"] == []
    # a JSON body sent with a form content type (what `curl -d` does) is still read as JSON
    r = requests.post(service["url"] + "/v1/score", data=json.dumps({"items": items}), timeout=60,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["scores"] == out["scores"]


def test_compare_equals_score_pairs(service, rm):
    rejected = [" No.", " I won't help with that.", " London."]
    pairs = [{"prompt": p, "chosen": c, "rejected": x} for p, c, x in zip(PROMPTS, RESPONSES, rejected)]
    out = post(service["url"], "/v1/compare", {"pairs": pairs}).json()
    chosen, rej = rm.score_pairs(PROMPTS, RESPONSES, rejected)
    assert out["chosen_scores"] == pytest.approx(chosen, abs=1e-5)
    assert out["rejected_scores"] == pytest.approx(rej, abs=1e-5)
    assert out["margins"] == pytest.approx([c - x for c, x in zip(chosen, rej)], abs=1e-5)


def openrlhf_post(url: str, queries: list[str], prompts: list, labels: list) -> dict:
    """What OpenRLHF's ``SingleTurnAgentExecutor._fetch_rewards_via_http`` (openrlhf/utils/agent.py) does with
    ``--remote_rm_url URL``: aiohttp POST of ``{"query", "prompts", "labels"}`` to URL as given, no headers,
    ``raise_for_status``, ``response.json()``; it then reads ``scores`` (else ``rewards``) and ``extra_logs``."""
    import asyncio

    import aiohttp

    async def post():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            async with session.post(url, json={"query": queries, "prompts": prompts, "labels": labels}) as response:
                response.raise_for_status()
                return await response.json()

    return asyncio.run(post())


def test_openrlhf_get_reward(service, rm):
    """Queries are OpenRLHF's ``tokenizer.decode(prompt + action tokens, skip_special_tokens=False)``: the
    templated prompt, the response, eos, possibly left pads; one query per request in OpenRLHF, many here."""
    from sparserm.model.text import prompt_text

    tok = rm.backbone.tokenizer
    queries = [tok.pad_token * i + prompt_text(tok, p, True) + r + tok.eos_token
               for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]
    queries.append("plain text without any template")
    out = openrlhf_post(service["url"] + "/get_reward", queries, PROMPTS + [""], [None, "a", 1, None])
    expected = rm.score(PROMPTS + [""], RESPONSES + [queries[-1]])  # no marker: the query is the response
    assert out["rewards"] == pytest.approx(expected, abs=1e-5)
    assert out["scores"] == out["rewards"] and isinstance(out["extra_logs"], dict)
    one = openrlhf_post(service["url"] + "/get_reward", queries[:1], PROMPTS[:1], [None])
    assert one["scores"] == pytest.approx(expected[:1], abs=1e-5)
    # padding does not count against serve.max_text_chars (a batch's short query was refused, or with
    # overlong: truncate kept only pads and scored an empty text)
    padded = tok.pad_token * LIMITS["max_text_chars"] + queries[0]
    assert openrlhf_post(service["url"] + "/get_reward", [padded], PROMPTS[:1], [None])["rewards"] == \
        pytest.approx(expected[:1], abs=1e-5)
    r = post(service["url"], "/get_reward", {"query": [queries[0], tok.pad_token * 3 + tok.eos_token]})
    assert r.status_code == 422 and r.json()["field"] == "query.1" and "empty" in r.json()["detail"]


def test_auth(service):
    url, body = service["auth_url"], {"items": [{"prompt": "hi", "response": "hello"}]}
    assert post(url, "/v1/score", body).status_code == 401
    assert post(url, "/v1/score", body, token="wrong").status_code == 401
    assert requests.post(url + "/v1/score", json=body, headers={"Authorization": service["token"]}).status_code == 401
    assert post(url, "/get_reward", {"query": ["x"]}).status_code == 401
    assert requests.get(url + "/openapi.json", timeout=30).status_code == 401
    assert post(url, "/v1/score", {"bad": 1}).status_code == 401  # auth comes before validation
    assert post(url, "/v1/score", body, token=service["token"]).status_code == 200
    assert post(service["url"], "/v1/score", body).status_code == 200  # the app without a token


@pytest.mark.parametrize("data,status,field", [
    ("{not json", 400, "body"),
    ("[1, 2]", 422, "body"),
    ('{"items": [{"prompt": "a"}]}', 422, "items.0.response"),
    ('{"items": [{"prompt": 3, "response": "x"}]}', 422, "items.0.prompt"),
    ('{"items": [{"prompt": "a", "respone": "x"}]}', 422, "items.0.response"),
    ('{"items": "x"}', 422, "items"),
    ('{"items": [{"prompt": [{"role": "user"}], "response": "x"}]}', 422, "items.0.prompt.0.content"),
    ('{"items": [{"prompt": "a", "response": "b"}, {"prompt": " ", "response": ""}]}', 422, "items.1"),
    ('{"items": [{"prompt": [{"role": "user", "content": ""}], "response": ""}]}', 422, "items.0"),
    ("", 422, "body"),
])
def test_bad_requests(service, data, status, field):
    r = post(service["url"], "/v1/score", data=data)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    r = post(service["url"], "/get_reward", data='{"query": "not a list"}')
    assert r.status_code == 422 and r.json()["field"] == "query"


def test_limits_reject_and_truncate(service, rm):
    url, n, chars = service["url"], LIMITS["max_items_per_request"], LIMITS["max_text_chars"]
    many = {"items": [{"prompt": "p", "response": "r"}] * (n + 1)}
    r = post(url, "/v1/score", many)
    assert r.status_code == 413 and r.json()["field"] == "items"
    long = "word " * chars
    r = post(url, "/v1/score", {"items": [{"prompt": "p", "response": "ok"}, {"prompt": "p", "response": long}]})
    assert r.status_code == 413 and r.json()["field"] == "items.1.response"
    r = post(url, "/v1/compare", {"pairs": [{"prompt": long, "chosen": "a", "rejected": "b"}]})
    assert r.status_code == 413 and r.json()["field"] == "pairs.0.prompt"
    assert post(url, "/get_reward", {"query": [long]}).status_code == 413
    # the truncating app keeps the last max_text_chars characters and reports the item
    r = post(service["auth_url"], "/v1/score", {"items": [{"prompt": "p", "response": "ok"},
                                                          {"prompt": "p", "response": long}]}, token=service["token"])
    assert r.status_code == 200 and r.json()["truncated"] == [1]
    assert r.json()["scores"] == pytest.approx(rm.score(["p", "p"], ["ok", long[-chars:]]), abs=1e-5)
    assert post(service["auth_url"], "/v1/score", many, token=service["token"]).status_code == 413


def test_replica_survives_bad_requests(service):
    for data in ("{", "null", '{"items": [null]}', '{"items": [{"prompt": "\\ud800", "response": "\\udfff"}]}',
                 '{"items": [{"prompt": {"a": 1}, "response": []}]}'):
        assert post(service["url"], "/v1/score", data=data).status_code < 500
    assert requests.get(service["url"] + "/v1/score", timeout=30).status_code == 405
    assert requests.get(service["url"] + "/nope", timeout=30).status_code == 404
    assert post(service["url"], "/v1/score", {"items": [{"prompt": "p", "response": "r"}]}).status_code == 200
