"""Prompts to token ids, with the work per request bounded by the context size.

Cheap bounds come first, on the validated request and before any tokenization: a text longer
than the context could hold with this tokenizer's longest token (times a slack for
normalisation and dropped whitespace) is refused at once, so is a token-id list longer than the
context, and a chat with more messages than the context has tokens. What passes is tokenized in
a small thread pool, off the event loop: a long tokenization never stalls `/health` or the
other requests. The context check on the exact token count follows.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cdlm.errors import ContextLengthError, InvalidRequestError
from cdlm.tokenizer import ChatTemplateError, Tokenizer

from .errors import APIError, invalid_request

# A text may be this many times longer (in characters) than the context filled with the
# tokenizer's longest token before it is refused unread: room for Unicode normalisation that
# merges characters and for whitespace a pre-tokenizer drops. Only absurd inputs exceed it.
TEXT_BOUND_SLACK = 4


@dataclass(frozen=True)
class PromptBounds:
    max_model_len: int
    max_text_chars: int

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, max_model_len: int) -> "PromptBounds":
        return cls(max_model_len,
                   max_model_len * max(1, tokenizer.max_token_chars) * TEXT_BOUND_SLACK)

    def check_text(self, chars: int, param: str) -> None:
        if chars > self.max_text_chars:
            raise context_error(ContextLengthError(
                f"The {param} is {chars} characters long; this model's maximum context length "
                f"of {self.max_model_len} tokens cannot hold more than {self.max_text_chars} "
                f"characters with its tokenizer. Reduce the {param}.", param=param))

    def check_ids(self, count: int, param: str = "prompt") -> None:
        if count > self.max_model_len:
            raise context_error(ContextLengthError(
                f"The prompt has {count} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens. Reduce the prompt.", param=param))

    def check_messages(self, messages: list[dict[str, str]]) -> None:
        if len(messages) > self.max_model_len:
            raise invalid_request(f"{len(messages)} messages cannot fit this model's context "
                                  f"of {self.max_model_len} tokens.", param="messages",
                                  code="context_length_exceeded")
        self.check_text(sum(len(m["content"]) for m in messages), "messages")


def context_error(exc: ContextLengthError) -> APIError:
    return invalid_request(str(exc), param=exc.param, code="context_length_exceeded")


class PromptEncoder:
    """Tokenizes prompts in a bounded thread pool (the app owns one; `close` at shutdown)."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int, threads: int,
                 special_tokens_in_chat_content: bool = False) -> None:
        self.tokenizer = tokenizer
        self.bounds = PromptBounds.for_tokenizer(tokenizer, max_model_len)
        self.special_tokens_in_chat_content = special_tokens_in_chat_content
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cdlm-tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def completion_prompts(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids of each prompt (text gets the model's start token)."""
        for p in prompts:
            if isinstance(p, str):
                self.bounds.check_text(len(p), "prompt")
            else:
                self.bounds.check_ids(len(p))
        out: list[list[int]] = []
        for p in prompts:
            ids = await self._run(self.tokenizer.encode_prompt, p) if isinstance(p, str) else p
            if not ids:
                raise invalid_request("prompt must not be empty.", param="prompt")
            out.append(ids)
        return out

    async def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template applied to the messages, as token ids."""
        self.bounds.check_messages(messages)
        try:
            return await self._run(self._encode_chat, messages)
        except (ChatTemplateError, InvalidRequestError) as exc:  # the request's fault
            raise invalid_request(str(exc), param="messages") from exc

    def _encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode_chat(
            messages, special_tokens_in_content=self.special_tokens_in_chat_content)

    def check_context(self, prompt_len: int, max_tokens: int) -> None:
        max_len = self.bounds.max_model_len
        if prompt_len + max_tokens > max_len:
            raise context_error(ContextLengthError.for_request(max_len, prompt_len, max_tokens))
