"""Configuration dataclasses: one per layer of the system, each validating itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Family = Literal["llada", "dream"]
FAMILIES: tuple[str, ...] = ("llada", "dream")


@dataclass
class ModelConfig:
    """A family-neutral view of a diffusion LM checkpoint.

    `family` decides the module names (so real checkpoints and peft adapters load as they are)
    and the prediction offset: LLaDA predicts position i from hidden state i, Dream (initialised
    from an autoregressive Qwen2) from hidden state i-1.
    """

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int | None = None
    max_position_embeddings: int = 4096
    block_size: int = 32
    tie_word_embeddings: bool = False
    # The original config.json of the checkpoint, kept so that saving writes it back unchanged.
    source_config: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "block_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        for name in ("mask_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is outside the vocabulary")

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "ModelConfig":
        """Read a checkpoint's config.json (either family's format); peft calls this too."""
        from cdlm.models.loader import load_config, resolve_model_path
        return load_config(resolve_model_path(name_or_path))

    @property
    def model_type(self) -> str:
        return self.family

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def prediction_shift(self) -> int:
        """How many positions back the hidden state that predicts a token sits."""
        return 1 if self.family == "dream" else 0

    @property
    def rope_rotation_in_fp32(self) -> bool:
        # LLaDA rotates q/k in fp32; Qwen2/Dream casts cos/sin to the activation dtype.
        return self.family == "llada"


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
