"""A finished :class:`~sparserm.serve.chat_batch.ChatJob` as OpenAI's answers: one ``chat.completion``, or a
stream's chunks as server-sent events (``data: <json>`` lines, ending with ``data: [DONE]``).

A stream sends a first chunk per choice with the assistant role, then each choice's text as it is generated,
then a chunk per choice with the rest of its text and its ``finish_reason`` (the last of them with ``steering``),
and, with ``stream_options.include_usage``, a chunk with no choices and ``usage``. An error after the stream
started is a ``data: {"error": ErrorBody}`` event (what OpenAI's clients raise from), then ``[DONE]``.
"""
from __future__ import annotations

import json

from sparserm.serve.chat_batch import ChatJob
from sparserm.serve.chat_schema import (AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChoiceEdits,
                                        ChunkChoice, Delta, SteeringReport, Usage)

DONE = "data: [DONE]\n\n"
_COUNTS = {"edited_tokens": 0, "edited_latents": 0, "edited_latent_ids": [], "latent_edits": 0}


def finish_reason(job: ChatJob, c: int, out) -> str:
    return "stop" if out.finished or job.trackers[c].hit_stop else "length"


def usage(job: ChatJob, outs: list) -> Usage:
    done = sum(o.n_tokens for o in outs)
    return Usage(prompt_tokens=job.prompt_tokens, completion_tokens=done, total_tokens=job.prompt_tokens + done)


def steering_report(job: ChatJob, outs: list) -> SteeringReport:
    s = job.settings
    edits = [ChoiceEdits(index=c, **{k: (o.steering or {}).get(k, v) for k, v in _COUNTS.items()})
             for c, o in enumerate(outs)]
    latents = next((o.steering["latents"] for o in outs if o.steering), [])
    edited = sorted(set().union(*(e.edited_latent_ids for e in edits)))  # the response's: every choice's together
    return SteeringReport(enabled=s.enabled, alpha=s.alpha, mode=s.mode, k_prompt=s.k_prompt, k_diff=s.k_diff,
                          latents=latents, edited_tokens=sum(e.edited_tokens for e in edits),
                          edited_latents=len(edited), edited_latent_ids=edited,
                          latent_edits=sum(e.latent_edits for e in edits), choices=edits)


def completion(job: ChatJob, outs: list, rid: str, created: int, model: str) -> ChatCompletion:
    for t in job.trackers:
        t.finish()
    choices = [Choice(index=c, message=AssistantMessage(content=job.trackers[c].text),
                      finish_reason=finish_reason(job, c, o)) for c, o in enumerate(outs)]
    return ChatCompletion(id=rid, created=created, model=model, choices=choices, usage=usage(job, outs),
                          steering=steering_report(job, outs))


def event(data) -> str:
    """One server-sent event; ASCII JSON (a lone surrogate in generated text cannot fail the encoding)."""
    if hasattr(data, "model_dump"):
        data = data.model_dump(exclude_none=True)
    return f"data: {json.dumps(data, ensure_ascii=True, separators=(',', ':'))}\n\n"


class Chunks:
    """The chunks of one stream (same id, created and model in each)."""

    def __init__(self, rid: str, created: int, model: str):
        self.head = dict(id=rid, created=created, model=model)

    def chunk(self, choices: list[ChunkChoice], **extra) -> str:
        return event(ChatCompletionChunk(**self.head, choices=choices, **extra))

    def opening(self, n: int) -> str:
        return self.chunk([ChunkChoice(index=c, delta=Delta(role="assistant", content="")) for c in range(n)])

    def text(self, c: int, text: str) -> str:
        return self.chunk([ChunkChoice(index=c, delta=Delta(content=text))])

    def closing(self, job: ChatJob, outs: list, include_usage: bool) -> list[str]:
        out = []
        for c, o in enumerate(outs):
            last = c == len(outs) - 1
            choice = ChunkChoice(index=c, delta=Delta(content=job.trackers[c].finish() or None),
                                 finish_reason=finish_reason(job, c, o))
            out.append(self.chunk([choice], steering=steering_report(job, outs) if last else None))
        if include_usage:
            out.append(self.chunk([], usage=usage(job, outs)))
        return out
