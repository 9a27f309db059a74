"""Typed errors the engine raises for a request it will not run.

Callers decide what each means for them (the HTTP server maps them to status codes: bad input
and context length to 400, a full queue to 429) without reading the message text. Torch-free,
so the scheduler can raise them too.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """The request itself is wrong (bad prompt, bad parameter); retrying it cannot help.

    `param` names the offending request field when one is to blame."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """Prompt plus generation length do not fit the model's context (or the whole KV cache)."""

    def __init__(self, message: str, param: str | None = "max_tokens") -> None:
        super().__init__(message, param)

    @classmethod
    def for_request(cls, max_model_len: int, prompt_len: int,
                    max_tokens: int) -> "ContextLengthError":
        """The error for prompt + max_tokens over the context, with all three numbers."""
        return cls(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
            f"{max_tokens} for the completion (max_tokens)). Reduce the prompt or max_tokens.",
            param="prompt" if prompt_len >= max_model_len else "max_tokens")


class QueueFullError(RuntimeError):
    """The waiting queue cannot take the request now; the caller should retry later."""

    def __init__(self, message: str, waiting: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.waiting = waiting
        self.limit = limit
