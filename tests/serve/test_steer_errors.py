"""The steered chat service's errors as the ``openai`` client raises them: each status, the field named in the one
ErrorBody, and that answer as the OpenAPI document describes it."""
from __future__ import annotations

import openai
import pytest
import requests
import schemathesis

from sparserm.serve.errors import ErrorBody
from tests.serve.conftest import ASK, LIMITS

@pytest.fixture(scope="module")
def chat_op(steer_service):
    api = schemathesis.openapi.from_url(steer_service["url"] + "/openapi.json",
                                        headers={"Authorization": f"Bearer {steer_service['token']}"})
    return api["/v1/chat/completions"]["POST"]


def raised(exc_type, call, status: int, field: str, op=None):
    """``call()`` raises ``exc_type`` with ``status`` and an ErrorBody naming ``field``, documented for ``op``."""
    with pytest.raises(exc_type) as info:
        call()
    err = info.value
    assert err.status_code == status and err.body["field"] == field, err.body
    ErrorBody.model_validate(err.body)
    if op is not None:
        assert str(status) in op.definition.raw["responses"]
        op.validate_response(err.response)  # raises when the body does not match the documented schema
    return err


def test_auth(steer_service, chat_op):
    wrong = openai.OpenAI(base_url=steer_service["url"] + "/v1", api_key="not-the-token", max_retries=0)
    err = raised(openai.AuthenticationError, lambda: wrong.chat.completions.create(model="m", messages=ASK), 401,
                 "Authorization", chat_op)
    assert err.response.headers["WWW-Authenticate"] == "Bearer"
    raised(openai.AuthenticationError, lambda: wrong.models.list(), 401, "Authorization")
    raised(openai.AuthenticationError, lambda: wrong.chat.completions.create(model="m", messages=ASK, stream=True),
           401, "Authorization")
    assert requests.get(steer_service["url"] + "/v1/models", timeout=30).status_code == 401  # no token at all


def test_unprocessable_names_the_field(steer_client, chat_op):
    def create(**kw):
        steering = kw.pop("steering", None)
        return lambda: steer_client.chat.completions.create(model="m", **{"messages": ASK, **kw},
                                                      extra_body={"steering": steering} if steering else None)

    err = raised(openai.UnprocessableEntityError, create(steering={"mode": "boost"}), 422, "steering.mode", chat_op)
    assert "steering.mode" in err.body["detail"] and err.body["errors"][0]["type"] == "literal_error"
    raised(openai.UnprocessableEntityError, create(steering={"mode": "boost"}, stream=True), 422, "steering.mode")
    raised(openai.UnprocessableEntityError, create(steering={"alpha": -1}), 422, "steering.alpha", chat_op)
    raised(openai.UnprocessableEntityError, create(steering={"k_diff": 0}), 422, "steering.k_diff")
    raised(openai.UnprocessableEntityError, create(steering={"boost": 2}), 422, "steering.boost")
    raised(openai.UnprocessableEntityError, create(max_tokens=100_000), 422, "max_tokens", chat_op)
    raised(openai.UnprocessableEntityError, create(max_completion_tokens=0), 422, "max_completion_tokens")
    raised(openai.UnprocessableEntityError, create(temperature=3.0), 422, "temperature")
    raised(openai.UnprocessableEntityError, create(messages=[]), 422, "messages")
    raised(openai.UnprocessableEntityError, create(stop=["a", "b", "c", "d", "e"]), 422, "stop")


def test_over_the_limits(steer_client, chat_op):
    n, chars = LIMITS["max_items_per_request"], LIMITS["max_text_chars"]

    def create(**kw):
        return lambda: steer_client.chat.completions.create(model="m", **{"messages": ASK, **kw})

    long = [{"role": "user", "content": "x" * (chars + 1)}]
    raised(openai.APIStatusError, create(messages=long), 413, "messages.0.content", chat_op)
    raised(openai.APIStatusError, create(messages=ASK * (n + 1)), 413, "messages", chat_op)
    raised(openai.APIStatusError, create(n=LIMITS["max_batch_size"] + 1), 413, "n", chat_op)
    wide = [{"role": "user", "content": "zq" * (chars // 2)}] * n  # each within the limits, together past 512 tokens
    err = raised(openai.APIStatusError, create(messages=wide), 413, "messages", chat_op)
    assert "context is 512" in err.body["detail"]
    huge = [{"role": "user", "content": "x" * (1 << 20)}]  # over the 1 MiB body cap
    raised(openai.APIStatusError, create(messages=huge), 413, "body", chat_op)
    raised(openai.APIStatusError, create(messages=huge, stream=True), 413, "body")


def test_invalid_json_and_router_errors(steer_service, chat_op):
    auth = {"Authorization": f"Bearer {steer_service['token']}", "Content-Type": "application/json"}
    r = requests.post(steer_service["url"] + "/v1/chat/completions", data="{not json", headers=auth, timeout=30)
    assert r.status_code == 400 and r.json()["field"] == "body"
    chat_op.validate_response(r)
    for r, status in ((requests.get(steer_service["url"] + "/v1/nope", headers=auth, timeout=30), 404),
                      (requests.get(steer_service["url"] + "/v1/chat/completions", headers=auth, timeout=30), 405)):
        assert r.status_code == status and ErrorBody.model_validate(r.json()).field is None
