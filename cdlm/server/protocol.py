"""Request models of the OpenAI-compatible API (responses: `cdlm/server/responses.py`).

Requests are validated strictly (no silent coercion of `"16"` to 16, unknown fields rejected;
an integral float such as `64.0` is accepted where an integer is expected, as vLLM does) and
every field the server does not implement is either accepted only at its no-op value or
rejected with a 400 that names it; several such fields are named together in one 400. A
client must never get silently different semantics.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from .errors import invalid_request, unsupported_many

MAX_N = 128
MAX_STOP = 64            # OpenAI allows 4; lm-eval sends every `until` string plus the end token
MAX_STOP_CHARS = 1024
MAX_SEED = 2**63 - 1
MAX_TOKENS_PER_STEP = 1 << 16


def _integral(value: Any) -> Any:
    """`64.0` -> 64 (clients written for vLLM send JSON numbers); anything else unchanged, so
    strict validation still refuses `64.5`, `"64"` and `true`."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = Field(
        default=None, description="vLLM extension: usage in every chunk")


def doc(description: str | None = None, **schema: Any) -> Any:
    """An optional field whose OpenAPI schema states what the checks below accept (the checks
    themselves give the error messages)."""
    return Field(default=None, description=description, json_schema_extra=schema or None)


_NULL = {"type": "null"}
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
_STOP_SCHEMA = {"anyOf": [_STOP_STRING, {"type": "array", "items": _STOP_STRING,
                                         "maxItems": MAX_STOP}, _NULL],
                "description": f"up to {MAX_STOP} stop strings"}


class SamplingFields(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = doc("the served model name (404 for another)")
    max_tokens: Int | None = doc("generation length (prompt + max_tokens <= the context)",
                                 minimum=1)
    temperature: float | None = doc("0 (or below 1e-5): greedy", minimum=0, maximum=2)
    top_p: float | None = doc(None, exclusiveMinimum=0, maximum=1)
    top_k: Int | None = doc("sample among the k most likely tokens; -1 or 0: no limit",
                            minimum=-1)
    min_p: float | None = doc("drop tokens less likely than min_p times the most likely one",
                              minimum=0, maximum=1)
    n: Int | None = doc("choices per prompt (prompts x n <= --max-queue)", minimum=1,
                        maximum=MAX_N)
    stop: Annotated[str | list[str] | None, WithJsonSchema(_STOP_SCHEMA)] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = doc("only with stream: true")
    seed: Int | None = doc(None, minimum=0, maximum=MAX_SEED)
    user: str | None = doc("accepted, not used")
    # Extensions
    threshold: float | None = doc("confidence threshold", exclusiveMinimum=0, maximum=1)
    tokens_per_step: Int | None = doc("finalise exactly k tokens per step (1 = naive)",
                                      minimum=1, maximum=MAX_TOKENS_PER_STEP)
    ignore_eos: bool | None = None
    # Accepted only at their no-op values
    logit_bias: dict[str, Any] | None = doc("not supported: only {} or null", maxProperties=0)
    presence_penalty: float | None = doc("not supported: only 0", minimum=0, maximum=0)
    frequency_penalty: float | None = doc("not supported: only 0", minimum=0, maximum=0)

    def check_common(self, max_model_len: int) -> None:
        self._check_values(max_model_len)
        unsupported = self._unsupported()
        if unsupported:
            raise unsupported_many(unsupported)

    def _check_values(self, max_model_len: int) -> None:
        if self.max_tokens is not None:
            if self.max_tokens < 1:
                raise invalid_request(f"max_tokens must be at least 1, got {self.max_tokens}.",
                                      param="max_tokens")
            if self.max_tokens > max_model_len:
                raise invalid_request(
                    f"max_tokens={self.max_tokens} is larger than the model's context length "
                    f"of {max_model_len} tokens.", param="max_tokens",
                    code="context_length_exceeded")
        _in_range("temperature", self.temperature, 0.0, 2.0)
        _in_range("min_p", self.min_p, 0.0, 1.0)
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise invalid_request(f"top_p must be in (0, 1], got {self.top_p}.", param="top_p")
        if self.top_k is not None and self.top_k < -1:
            raise invalid_request(f"top_k must be -1, 0 (no limit) or positive, got "
                                  f"{self.top_k}.", param="top_k")
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise invalid_request(f"n must be between 1 and {MAX_N}, got {self.n}.", param="n")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise invalid_request(f"threshold must be in (0, 1], got {self.threshold}.",
                                  param="threshold")
        if self.tokens_per_step is not None and not 1 <= self.tokens_per_step <= MAX_TOKENS_PER_STEP:
            raise invalid_request(f"tokens_per_step must be in [1, {MAX_TOKENS_PER_STEP}], got "
                                  f"{self.tokens_per_step}.", param="tokens_per_step")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise invalid_request(f"seed must be in [0, 2^63-1], got {self.seed}.", param="seed")
        stops = self.stop_list()
        if len(stops) > MAX_STOP:
            raise invalid_request(f"stop accepts at most {MAX_STOP} sequences, got {len(stops)}.",
                                  param="stop")
        if any(s == "" for s in stops):
            raise invalid_request("stop sequences must be non-empty strings.", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise invalid_request(f"stop sequences may be at most {MAX_STOP_CHARS} characters.",
                                  param="stop")
        if self.stream_options is not None and not self.stream:
            raise invalid_request("stream_options is only allowed when stream is true.",
                                  param="stream_options")

    def _unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for each field present at a value this server does not implement."""
        out = []
        if self.logit_bias:
            out.append(("logit_bias", ""))
        if self.presence_penalty not in (None, 0, 0.0):
            out.append(("presence_penalty", "only 0 is accepted"))
        if self.frequency_penalty not in (None, 0, 0.0):
            out.append(("frequency_penalty", "only 0 is accepted"))
        return out

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


def _in_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise invalid_request(f"{name} must be in [{low:g}, {high:g}], got {value}.", param=name)


_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT_SCHEMA = {
    "anyOf": [{"type": "string", "minLength": 1},
              {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
              _TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1}],
    "description": "a string, a list of strings, token ids, or token-id lists"}


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"required": ["prompt"]})

    # Validated by `normalize_prompt` (lengths before elements); the schema documents the forms.
    prompt: Annotated[Any, WithJsonSchema(_PROMPT_SCHEMA)] = None
    # Accepted only at their no-op values
    suffix: str | None = doc("not supported: only empty or null", maxLength=0)
    logprobs: Annotated[Int | None, WithJsonSchema(_NULL)] = None
    best_of: Int | None = doc("only 1", minimum=1, maximum=1)
    echo: bool | None = doc("only false", enum=[False, None])

    def check(self, max_model_len: int, vocab_size: int,
              max_prompts: int) -> list[str | list[int]]:
        """Validate and return the prompts (each a string or a token-id list)."""
        self._check_values(max_model_len)
        unsupported = self._unsupported()
        if self.suffix:
            unsupported.append(("suffix", ""))
        if self.logprobs is not None:
            unsupported.append(("logprobs", "log probabilities are not implemented"))
        if self.best_of not in (None, 1):
            unsupported.append(("best_of", "only best_of=1 is accepted"))
        if self.echo:
            unsupported.append(("echo", ""))
        if unsupported:
            raise unsupported_many(unsupported)
        return normalize_prompt(self.prompt, vocab_size, max_model_len, max_prompts)


def normalize_prompt(prompt: Any, vocab_size: int, max_model_len: int,
                     max_prompts: int) -> list[str | list[int]]:
    """The prompts of a completions request, each a string or token ids. Lengths are checked
    before elements, so an oversized prompt costs no scan."""
    shape_msg = ("prompt must be a string, a list of strings, a list of token ids or a list "
                 "of token-id lists.")
    if prompt is None:
        raise invalid_request("prompt is required.", param="prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list):
        if not prompt:
            raise invalid_request("prompt must not be empty.", param="prompt")
        if _is_int(prompt[0]):
            prompts = [prompt]
        else:
            prompts = list(prompt)
            if len(prompts) > max_prompts:
                raise invalid_request(f"prompt holds {len(prompts)} prompts; at most "
                                      f"{max_prompts} per request.", param="prompt")
    else:
        raise invalid_request(shape_msg, param="prompt")
    for p in prompts:
        if isinstance(p, list) and len(p) > max_model_len:
            raise invalid_request(
                f"The prompt has {len(p)} tokens; this model's maximum context length is "
                f"{max_model_len} tokens. Reduce the prompt.", param="prompt",
                code="context_length_exceeded")
    kinds = {type(p) for p in prompts}
    if kinds not in ({str}, {list}) or (
            kinds == {list} and not all(_is_int(x) for p in prompts for x in p)):
        raise invalid_request(shape_msg, param="prompt")
    for p in prompts:
        if len(p) == 0:
            raise invalid_request("prompt must not be empty.", param="prompt")
        if isinstance(p, list):
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise invalid_request(
                    f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size}).",
                    param="prompt")
    return prompts


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True,
                              json_schema_extra={"required": ["type", "text"]})
    type: Annotated[str, WithJsonSchema({"const": "text", "description": "only text"})]
    text: str | None = doc(None, type="string")


# content may be null only in an assistant message (a client echoing a tool-call turn).
_CONTENT_RULE = {"anyOf": [
    {"properties": {"content": {"not": {"type": "null"}}}, "required": ["content"]},
    {"properties": {"role": {"const": "assistant"}}}]}


def _message_schema(schema: dict[str, Any]) -> None:
    schema.update(_CONTENT_RULE)
    schema["properties"]["tool_calls"] = {"anyOf": [{"type": "array", "maxItems": 0},
                                                    {"type": "null"}]}


class ChatMessage(BaseModel):
    # Clients echo back assistant messages with extra keys (refusal, annotations...): accept
    # them, but reject the ones that would need features this server lacks.
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_message_schema)
    role: Annotated[Literal["system", "developer", "user", "assistant", "tool"], WithJsonSchema(
        {"enum": ["system", "developer", "user", "assistant"],
         "description": "tool messages need tool calling, which is not implemented"})]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def unsupported(self, index: int) -> list[tuple[str, str]]:
        out = []
        if self.role == "tool":
            out.append((f"messages[{index}].role", "tool messages need tool calling, which is "
                                                   "not implemented"))
        if (self.model_extra or {}).get("tool_calls", None) not in (None, []):
            out.append((f"messages[{index}].tool_calls", "tool calling is not implemented"))
        if isinstance(self.content, list):
            for j, part in enumerate(self.content):
                if part.type != "text" or part.text is None:
                    out.append((f"messages[{index}].content[{j}]",
                                f"content type '{part.type}' (only text is supported)"))
        return out

    def text(self, index: int) -> str:
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise invalid_request(f"messages[{index}].content is required.",
                                  param=f"messages[{index}].content")
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"required": ["messages"]})

    messages: list[ChatMessage] = doc(None, minItems=1)
    max_completion_tokens: Int | None = doc("the newer spelling of max_tokens (wins when both are sent)",
                                            minimum=1)
    # Accepted only at their no-op values
    logprobs: bool | None = doc("only false", enum=[False, None])
    top_logprobs: Int | None = doc("only 0", minimum=0, maximum=0)
    tools: list[Any] | None = doc("not supported: only [] or null", maxItems=0)
    tool_choice: Annotated[Any, WithJsonSchema({"enum": ["none", None]})] = None
    functions: list[Any] | None = doc("not supported: only [] or null", maxItems=0)
    function_call: Annotated[Any, WithJsonSchema({"enum": ["none", None]})] = None
    parallel_tool_calls: bool | None = None
    response_format: Annotated[dict[str, Any] | None, WithJsonSchema({"anyOf": [
        {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"]},
        _NULL]})] = None
    modalities: Annotated[list[str] | None, WithJsonSchema(
        {"anyOf": [{"const": ["text"]}, _NULL]})] = None
    audio: Annotated[Any, WithJsonSchema(_NULL)] = None
    prediction: Annotated[Any, WithJsonSchema(_NULL)] = None
    reasoning_effort: Annotated[Any, WithJsonSchema(_NULL)] = None
    web_search_options: Annotated[Any, WithJsonSchema(_NULL)] = None
    store: bool | None = doc("only false", enum=[False, None])
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def check(self, max_model_len: int) -> list[dict[str, str]]:
        if self.max_completion_tokens is not None:   # the newer spelling wins (as in vLLM)
            self.max_tokens = self.max_completion_tokens
        self._check_values(max_model_len)
        unsupported = self._unsupported() + self._unsupported_chat()
        for i, m in enumerate(self.messages or []):
            unsupported += m.unsupported(i)
        if unsupported:
            raise unsupported_many(unsupported)
        if not self.messages:
            raise invalid_request("messages must be a non-empty list.", param="messages")
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(self.messages)]

    def _unsupported_chat(self) -> list[tuple[str, str]]:
        out = []
        if self.logprobs:
            out.append(("logprobs", "log probabilities are not implemented"))
        if self.top_logprobs:
            out.append(("top_logprobs", "log probabilities are not implemented"))
        if self.tools:
            out.append(("tools", "tool calling is not implemented"))
        if self.functions:
            out.append(("functions", "function calling is not implemented"))
        if self.tool_choice not in (None, "none"):
            out.append(("tool_choice", "tool calling is not implemented"))
        if self.function_call not in (None, "none"):
            out.append(("function_call", "function calling is not implemented"))
        if self.response_format is not None and self.response_format.get("type") != "text":
            out.append(("response_format", "only {'type': 'text'} is accepted"))
        if self.modalities is not None and self.modalities != ["text"]:
            out.append(("modalities", "only ['text'] is accepted"))
        for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
            if getattr(self, name) is not None:
                out.append((name, ""))
        if self.store:
            out.append(("store", "this server does not store completions"))
        return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


__all__ = ["ChatCompletionRequest", "CompletionRequest", "SamplingFields", "StreamOptions"]
