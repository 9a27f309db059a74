"""Request and response models of the OpenAI-compatible API.

Requests are validated strictly (no silent coercion of `"16"` to 16, unknown fields rejected)
and every field the server does not implement is either accepted only at its no-op value or
rejected with a 400 that names it: a client must never get silently different semantics.
Responses are plain dicts built by helpers here, so the JSON on the wire is exactly what the
OpenAI reference shows (`logprobs: null` included).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import invalid_request, unsupported

MAX_N = 128
MAX_STOP = 4
MAX_SEED = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM extension: usage in every chunk


class _SamplingFields(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    # Extensions
    threshold: float | None = Field(default=None, description="confidence threshold in (0, 1]")
    tokens_per_step: int | None = None   # finalise exactly k tokens per step (1 = naive)
    ignore_eos: bool | None = None
    # Accepted only at their no-op values
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def check_common(self, max_model_len: int | None = None) -> None:
        if self.max_tokens is not None:
            if self.max_tokens < 1:
                raise invalid_request(f"max_tokens must be at least 1, got {self.max_tokens}.",
                                      param="max_tokens")
            if max_model_len is not None and self.max_tokens > max_model_len:
                raise invalid_request(
                    f"max_tokens={self.max_tokens} is larger than the model's context length "
                    f"of {max_model_len} tokens.", param="max_tokens",
                    code="context_length_exceeded")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise invalid_request(f"temperature must be in [0, 2], got {self.temperature}.",
                                  param="temperature")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise invalid_request(f"top_p must be in (0, 1], got {self.top_p}.", param="top_p")
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise invalid_request(f"n must be between 1 and {MAX_N}, got {self.n}.", param="n")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise invalid_request(f"threshold must be in (0, 1], got {self.threshold}.",
                                  param="threshold")
        if self.tokens_per_step is not None and self.tokens_per_step < 1:
            raise invalid_request(f"tokens_per_step must be at least 1, got "
                                  f"{self.tokens_per_step}.", param="tokens_per_step")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise invalid_request(f"seed must be in [0, 2^63-1], got {self.seed}.", param="seed")
        stops = self.stop_list()
        if len(stops) > MAX_STOP:
            raise invalid_request(f"stop accepts at most {MAX_STOP} sequences, got {len(stops)}.",
                                  param="stop")
        if any(s == "" for s in stops):
            raise invalid_request("stop sequences must be non-empty strings.", param="stop")
        if self.stream_options is not None and not self.stream:
            raise invalid_request("stream_options is only allowed when stream is true.",
                                  param="stream_options")
        if self.logit_bias:
            raise unsupported("logit_bias")
        if self.presence_penalty not in (None, 0, 0.0):
            raise unsupported("presence_penalty", "only 0 is accepted")
        if self.frequency_penalty not in (None, 0, 0.0):
            raise unsupported("frequency_penalty", "only 0 is accepted")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream and self.stream_options
                    and self.stream_options.continuous_usage_stats)


class CompletionRequest(_SamplingFields):
    prompt: Any = None
    # Accepted only at their no-op values
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None
    echo: bool | None = None

    def check(self, max_model_len: int | None = None,
              vocab_size: int | None = None) -> list[str | list[int]]:
        """Validate and return the prompts (each a string or a token-id list)."""
        self.check_common(max_model_len)
        if self.suffix:
            raise unsupported("suffix")
        if self.logprobs is not None:
            raise unsupported("logprobs", "log probabilities are not implemented")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "only best_of=1 is accepted")
        if self.echo:
            raise unsupported("echo")
        return normalize_prompt(self.prompt, vocab_size)


def normalize_prompt(prompt: Any, vocab_size: int | None) -> list[str | list[int]]:
    shape_msg = ("prompt must be a string, a list of strings, a list of token ids or a list "
                 "of token-id lists.")
    if prompt is None:
        raise invalid_request("prompt is required.", param="prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list):
        if not prompt:
            raise invalid_request("prompt must not be empty.", param="prompt")
        if all(_is_int(x) for x in prompt):
            prompts = [prompt]
        elif all(isinstance(x, str) for x in prompt):
            prompts = list(prompt)
        elif all(isinstance(x, list) for x in prompt):
            prompts = list(prompt)
            for p in prompts:
                if not all(_is_int(x) for x in p):
                    raise invalid_request(shape_msg, param="prompt")
        else:
            raise invalid_request(shape_msg, param="prompt")
    else:
        raise invalid_request(shape_msg, param="prompt")
    for p in prompts:
        if len(p) == 0:
            raise invalid_request("prompt must not be empty.", param="prompt")
        if isinstance(p, list) and vocab_size is not None:
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise invalid_request(
                    f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size}).",
                    param="prompt")
    return prompts


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Clients echo back assistant messages with extra keys (refusal, annotations...): accept
    # them, but reject the ones that would need features this server lacks.
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.role == "tool":
            raise unsupported(f"messages[{index}].role", "tool messages need tool calling, "
                              "which is not implemented")
        extra = self.model_extra or {}
        if extra.get("tool_calls"):
            raise unsupported(f"messages[{index}].tool_calls")
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise invalid_request(f"messages[{index}].content is required.",
                                  param=f"messages[{index}].content")
        if isinstance(self.content, str):
            return self.content
        out = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise unsupported(f"messages[{index}].content[{j}]",
                                  f"content type '{part.type}' (only text is supported)")
            out.append(part.text)
        return "".join(out)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] | None = None
    max_completion_tokens: int | None = None
    # Accepted only at their no-op values
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def check(self, max_model_len: int | None = None) -> list[dict[str, str]]:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise invalid_request("max_tokens and max_completion_tokens disagree; send one.",
                                      param="max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
        self.check_common(max_model_len)
        if self.logprobs:
            raise unsupported("logprobs", "log probabilities are not implemented")
        if self.top_logprobs:
            raise unsupported("top_logprobs", "log probabilities are not implemented")
        if self.tools:
            raise unsupported("tools", "tool calling is not implemented")
        if self.functions:
            raise unsupported("functions", "function calling is not implemented")
        if self.tool_choice not in (None, "none"):
            raise unsupported("tool_choice", "tool calling is not implemented")
        if self.function_call not in (None, "none"):
            raise unsupported("function_call", "function calling is not implemented")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise unsupported("response_format", "only {'type': 'text'} is accepted")
        if self.modalities is not None and self.modalities != ["text"]:
            raise unsupported("modalities", "only ['text'] is accepted")
        for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
            if getattr(self, name) is not None:
                raise unsupported(name)
        if self.store:
            raise unsupported("store", "this server does not store completions")
        if not self.messages:
            raise invalid_request("messages must be a non-empty list.", param="messages")
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(self.messages)]


# ------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_dict(prompt_tokens: int, completion_tokens: int, steps: int,
               blocks: int) -> dict[str, int]:
    """OpenAI usage plus the diffusion figures: `denoising_steps` (forward passes the request's
    samples took part in, prefill excluded; the paper's central figure) and `num_blocks`."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "denoising_steps": steps,
        "num_blocks": blocks,
    }


def completion_response(rid: str, created: int, model: str, choices: list[dict],
                        usage: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _chunk(obj: str, rid: str, created: int, model: str, choices: list[dict],
           usage: dict | None, with_usage_key: bool) -> dict:
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if with_usage_key or usage is not None:
        out["usage"] = usage
    return out


def completion_chunk(rid: str, created: int, model: str, choices: list[dict],
                     usage: dict | None = None, with_usage_key: bool = False) -> dict:
    return _chunk("text_completion", rid, created, model, choices, usage, with_usage_key)


def chat_response(rid: str, created: int, model: str, choices: list[dict],
                  usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": finish_reason}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict],
               usage: dict | None = None, with_usage_key: bool = False) -> dict:
    return _chunk("chat.completion.chunk", rid, created, model, choices, usage, with_usage_key)


def chat_chunk_choice(index: int, text: str, finish_reason: str | None,
                      first: bool) -> dict:
    delta: dict[str, Any] = {"content": text}
    if first:
        delta = {"role": "assistant", "content": text}
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def models_response(names: list[str], created: int, root: str | None = None,
                    max_model_len: int | None = None) -> dict:
    return {"object": "list", "data": [
        {"id": n, "object": "model", "created": created, "owned_by": "cdlm",
         "root": root or n, "parent": None, "max_model_len": max_model_len} for n in names]}


__all__ = ["ChatCompletionRequest", "CompletionRequest", "StreamOptions"]
