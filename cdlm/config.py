"""Configuration dataclasses: one per layer of the system, each validating itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# ModelConfig is defined next to the family config.json readers that build it.
from cdlm.models.layouts import FAMILIES, Family, ModelConfig

__all__ = ["FAMILIES", "Family", "ModelConfig", "EngineConfig", "DecodingMode", "DECODING_MODES",
           "DEFAULT_THRESHOLD"]

DecodingMode = Literal["cdlm", "reference", "bidirectional"]
DECODING_MODES: tuple[str, ...] = ("cdlm", "reference", "bidirectional")


# The confidence threshold when neither the caller nor the checkpoint names one (SPEC, paper).
DEFAULT_THRESHOLD = 0.9


@dataclass
class EngineConfig:
    """Engine-wide settings: memory budget, batching limits and decoding defaults."""

    # None: the checkpoint's own default (`generation_config.json`), else DEFAULT_THRESHOLD.
    threshold: float | None = None
    block_size: int | None = None          # None: the model's block size
    max_num_seqs: int = 64                 # running requests at most
    kv_cache_tokens: int | None = None     # KV budget in tokens; None: derived from max_num_seqs
    page_size: int = 32                    # tokens per KV page
    max_queue: int = 256                   # waiting requests at most (past it: QueueFullError)
    # Prompt tokens admitted in one step at most (a prompt is bidirectional, so it is never
    # split across steps: this bounds how long one admission step can stall the others).
    max_prefill_tokens: int = 8192
    max_model_len: int | None = None       # None: the model's max_position_embeddings
    dtype: str | None = None               # None: float32 on CPU, bfloat16 on CUDA
    device: str | None = None              # None: cuda if available else cpu
    default_mode: DecodingMode = "cdlm"
    seed: int = 0                          # engine generator for unseeded sampling requests
    attention_backend: str = "auto"        # auto: the Triton kernel on CUDA, else plain torch
    cuda_graphs: bool = True               # replay steps without admissions from CUDA graphs
    compile_layer_ops: bool = False        # fuse norms/rotary/SiLU with torch.compile

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.page_size <= 0:
            raise ValueError("page_size must be positive")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.page_size:
            raise ValueError("kv_cache_tokens must hold at least one page")
        if self.max_prefill_tokens <= 0:
            raise ValueError("max_prefill_tokens must be positive")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.default_mode not in DECODING_MODES:
            raise ValueError(f"default_mode must be one of {DECODING_MODES}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError("attention_backend must be auto, torch or triton")
        if self.dtype not in (None, "float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")
