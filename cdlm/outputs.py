"""What the engine hands back: vLLM-shaped outputs with the diffusion step count."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    steps: int                 # denoising forward passes this request took part in
    num_blocks: int = 0        # finished (final) blocks so far


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_block_time: float | None = None
    last_block_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = None
    # Block steps completed in this engine step, for streaming metrics.
    new_block_steps: list[int] = field(default_factory=list)

    # Shortcuts for the single-sample case, which is what the engine produces.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def steps(self) -> int:
        return self.outputs[0].steps
