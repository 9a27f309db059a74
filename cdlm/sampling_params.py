"""Per-request generation parameters, in the vLLM style plus the diffusion-specific knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

# Temperatures below this are greedy: the tempered distribution is already a point mass in
# floating point, and dividing by it only risks overflow.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How one request is decoded.

    `threshold`: finalise every masked position whose confidence reaches it (None: the engine's
    default, i.e. the checkpoint's `generation_config.json` threshold, else 0.9); at least the
    most confident position is finalised each step.
    `tokens_per_step`: instead of the threshold, finalise exactly this many positions per step
    (the most confident). 1 gives the naive one-token-per-step policy.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0          # 0 (or -1, as vLLM writes it) = off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    threshold: float | None = None
    tokens_per_step: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            raise ValueError("max_tokens must be an integer")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 0 (or -1 for off), got {self.top_k}")
        if self.top_k == -1:
            self.top_k = 0
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.tokens_per_step is not None and self.tokens_per_step < 1:
            raise ValueError("tokens_per_step must be at least 1")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError("seed must be an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE
