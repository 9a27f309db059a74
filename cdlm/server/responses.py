"""Response models of the OpenAI-compatible API, and the builders the handlers use.

Every body the server sends is built from these pydantic models (`model_dump`), so the JSON on
the wire and the schemas in `/openapi.json` are the same thing. Fields that are always null
here (`logprobs`) are kept, as OpenAI's reference shows them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    denoising_steps: int = Field(description="forward passes the request's choices took part "
                                             "in, prefill excluded (the paper's central figure)")
    num_blocks: int = Field(description="finished decoding blocks of all choices")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One Server-Sent Event of a streamed chat completion (`data: <json>`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cdlm"
    root: str
    parent: None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "draining", "engine_dead"]
    reason: str | None = None


# ------------------------------------------------------------------------------------------
# Builders (plain dicts on the wire)


def usage_dict(prompt_tokens: int, completion_tokens: int, steps: int,
               blocks: int) -> dict[str, int]:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens, denoising_steps=steps,
                 num_blocks=blocks).model_dump()


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return CompletionChoice(index=index, text=text, finish_reason=finish_reason).model_dump()


def completion_response(rid: str, created: int, model: str, choices: list[dict],
                        usage: dict) -> dict:
    return CompletionResponse(id=rid, created=created, model=model, choices=choices,
                              usage=usage).model_dump()


def _chunk(model_cls: type[BaseModel], rid: str, created: int, model: str,
           choices: list[dict], usage: dict | None, with_usage_key: bool) -> dict:
    body = model_cls(id=rid, created=created, model=model, choices=choices,
                     usage=usage).model_dump()
    if not (with_usage_key or usage is not None):
        body.pop("usage")   # OpenAI: no usage key unless stream_options.include_usage
    return body


def completion_chunk(rid: str, created: int, model: str, choices: list[dict],
                     usage: dict | None = None, with_usage_key: bool = False) -> dict:
    """A streamed completion chunk has the shape of a completion response."""
    return _chunk(CompletionResponse, rid, created, model, choices, usage, with_usage_key)


def chat_response(rid: str, created: int, model: str, choices: list[dict],
                  usage: dict) -> dict:
    return ChatCompletionResponse(id=rid, created=created, model=model, choices=choices,
                                  usage=usage).model_dump()


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return ChatChoice(index=index, message=ChatMessageOut(content=text),
                      finish_reason=finish_reason).model_dump()


def chat_chunk(rid: str, created: int, model: str, choices: list[dict],
               usage: dict | None = None, with_usage_key: bool = False) -> dict:
    return _chunk(ChatCompletionChunk, rid, created, model, choices, usage, with_usage_key)


def chat_chunk_choice(index: int, text: str, finish_reason: str | None,
                      first: bool) -> dict:
    body = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant" if first else None,
                                                        content=text),
                           finish_reason=finish_reason).model_dump()
    if not first:
        body["delta"].pop("role")
    return body


def models_response(names: list[str], created: int, root: str | None = None,
                    max_model_len: int | None = None) -> dict:
    return ModelList(data=[ModelCard(id=n, created=created, root=root or n,
                                     max_model_len=max_model_len) for n in names]).model_dump()
