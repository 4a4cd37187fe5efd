"""Request/response schema of the reward-model service (pydantic; FastAPI publishes it at ``/openapi.json``
and ``/docs``). The error body is :class:`~sparserm.serve.errors.ErrorBody`; the limits are in
:mod:`sparserm.serve.limits`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


Prompt = str | list[ChatMessage]


class ScoreItem(_Strict):
    prompt: Prompt = Field(description="A prompt string (templated like the training data), or chat messages "
                                       "rendered with the backbone's chat template and a generation prompt")
    response: str


class ScoreRequest(_Strict):
    items: list[ScoreItem]


class ScoreResponse(BaseModel):
    scores: list[float]
    model: str
    truncated: list[int] = Field(default_factory=list, description="indices of items whose texts were cut")


class PairItem(_Strict):
    prompt: Prompt
    chosen: str
    rejected: str


class CompareRequest(_Strict):
    pairs: list[PairItem]


class CompareResponse(BaseModel):
    margins: list[float] = Field(description="score(chosen) - score(rejected), per pair")
    chosen_scores: list[float]
    rejected_scores: list[float]
    model: str
    truncated: list[int] = Field(default_factory=list)


class RewardRequest(BaseModel):
    """OpenRLHF's remote-RM request: ``query`` holds full texts (prompt + response, chat template applied).
    OpenRLHF also sends ``prompts`` and ``labels``; they are accepted and not used."""

    model_config = ConfigDict(extra="allow")
    query: list[str]
    prompts: list[Any] | None = None
    labels: list[Any] | None = None


class RewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]  # OpenRLHF >= 0.8 reads "scores" (falls back to "rewards")
    extra_logs: dict = Field(default_factory=dict)
    truncated: list[int] = Field(default_factory=list)


class HealthResponse(BaseModel):
    status: str
    model: str


# ---------------------------------------------------------------- vLLM's pooling route, as veRL calls it


class ClassifyRequest(BaseModel):
    """vLLM's ``POST /classify`` request (``ClassificationCompletionRequest``) for text inputs. veRL's reward loop
    sends ``{"model", "input": full chat-templated text, "use_activation": false}`` (``"activation"`` before
    vLLM 0.11.2). ``model`` is accepted and not checked; vLLM's other options are accepted and not used."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str] = Field(description="full texts: prompt + response through the chat template, as "
                                               "/get_reward's query")
    use_activation: bool | None = Field(default=None, description="false: probs holds the raw reward; true or "
                                                                  "unset: its sigmoid (vLLM's one-label default)")
    activation: bool | None = Field(default=None, description="vLLM < 0.11.2's name of use_activation")
    add_special_tokens: bool = Field(default=True, description="true: a templated input that lacks the BOS its "
                                                               "chat template starts with gets it back")


class ClassifyData(BaseModel):
    index: int
    label: str | None = None
    probs: list[float] = Field(description="one value: the reward (or its sigmoid, see use_activation)")
    num_classes: int = 1


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class ClassifyResponse(BaseModel):
    """vLLM's ``ClassificationResponse``; veRL reads ``data[-1]["probs"][-1]``."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: ClassifyUsage
    truncated: list[int] = Field(default_factory=list, description="indices of inputs whose texts were cut")
