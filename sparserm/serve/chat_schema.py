"""Request/response schema of the steered chat service: OpenAI's chat completions (the fields this service reads),
its models list, and the ``steering`` objects (pydantic; FastAPI publishes them at ``/openapi.json``).

A request may carry ``steering``: ``{"enabled", "alpha", "mode", "k_prompt", "k_diff"}``, each unset field the
map's own ``steer`` setting. Every answer carries ``steering`` beside ``usage``: the settings used, the latents the
prompt selected and how many token positions and latents were edited (a stream sends it in its last choice chunk).
OpenAI fields this service does not read (``frequency_penalty``, ``logprobs``, ``tools``, ...) are accepted and
ignored, as vLLM's server does; ``model`` is echoed, not checked (one model is served).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from sparserm.serve.errors import ErrorBody
from sparserm.serve.schema import ChatMessage
from sparserm.steering.edit import MODES

Mode = Literal[tuple(sorted(MODES))]  # type: ignore[valid-type]
MAX_ALPHA = 10.0  # far past any useful edit (DSPA: 0.2); larger ones only overflow the residual


class SteeringRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(default=True, description="false: this request is not steered")
    alpha: float | None = Field(default=None, ge=0, le=MAX_ALPHA, description="mode add: an active selected latent "
                                "moves by alpha x max(a_t) x sign(s_j); unset: the map's steer.alpha")
    mode: Mode | None = Field(default=None, description="add, or ablate (zero the selected latents whose map score "
                                                        "is negative); unset: the map's steer.mode")
    k_prompt: int | None = Field(default=None, ge=1, description="prompt gate: top input latents of g(x)")
    k_diff: int | None = Field(default=None, ge=1, description="output latents steered: top by |A^T g_gated|")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = Field(default=False, description="a last chunk with no choices carries usage")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = Field(default=None, description="echoed; not checked (one model is served)")
    messages: list[ChatMessage] = Field(min_length=1, description="rendered with the backbone's chat template and "
                                        "a generation prompt; never cut (the prompt and max_tokens must fit the "
                                        "model's context)")
    max_tokens: int | None = Field(default=None, ge=1, description="new tokens at most; unset: the map's "
                                   "align.generate.max_new_tokens; at most the model's context left after the prompt")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="OpenAI's newer name of max_tokens "
                                              "(wins when both are set)")
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 (or under 1e-5): greedy; unset: "
                                      "the map's align.generate.temperature")
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2 ** 63 - 1, description="sampling with a seed gets a batch "
                             "of its own, so the same request and seed give the same text")
    n: int = Field(default=1, ge=1, description="choices, at most serve.max_items_per_request")
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(
        default=None, description="up to 4 strings; a choice ends before the first one it produces")
    stream: bool = False
    stream_options: StreamOptions | None = None
    steering: SteeringRequest | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] = Field(description="stop: EOS or a stop string; length: max_tokens")
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChoiceEdits(BaseModel):
    index: int
    edited_tokens: int = Field(description="token positions of this choice whose residual the edit changed")
    edited_latents: int = Field(description="distinct output-SAE latents the edit changed in this choice")
    edited_latent_ids: list[int] = Field(default_factory=list, description="those latents, ascending")
    latent_edits: int = Field(description="(position, latent) entries changed in this choice")


class SteeringReport(BaseModel):
    """What steering did to this answer; zeros and no latents when it was off."""

    enabled: bool
    alpha: float
    mode: str
    k_prompt: int
    k_diff: int
    latents: list[int] = Field(default_factory=list, description="output latents the prompt selected")
    edited_tokens: int = Field(description="edited token positions, all choices together")
    edited_latents: int = Field(description="distinct latents edited in any choice (the union of the choices' "
                                            "sets; per choice in choices)")
    edited_latent_ids: list[int] = Field(default_factory=list, description="those latents, ascending")
    latent_edits: int = Field(description="(position, latent) entries changed, all choices together")
    choices: list[ChoiceEdits] = Field(default_factory=list)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    steering: SteeringReport


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a stream (``data: <chunk>``; the stream ends with ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    steering: SteeringReport | None = Field(default=None, description="in the stream's last choice chunk")


class StreamError(BaseModel):
    """The event of an error after a stream started (its 200 already sent); OpenAI's clients raise it."""

    error: ErrorBody
    status: int = Field(description="the status the error would have had")


_REF = "#/components/schemas/{}"
STREAM_RESPONSE = {200: {
    "description": "the completion; with stream=true, server-sent events: a ChatCompletionChunk (or a StreamError) "
                   "as JSON in each event's data, the last event's data [DONE]",
    "content": {"text/event-stream": {"schema": {  # OpenAPI < 3.2: the schema of each event
        "type": "object", "required": ["data"],
        "properties": {"event": {"type": "string"}, "data": {"anyOf": [
            {"type": "string", "const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
                {"$ref": _REF.format("ChatCompletionChunk")}, {"$ref": _REF.format("StreamError")}]}}]}}}}}}}
STREAM_SCHEMAS = (ChatCompletionChunk, StreamError)  # referenced by STREAM_RESPONSE only: guarded_app(schemas=...)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sparserm"
    root: str = Field(description="the backbone the map steers")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
