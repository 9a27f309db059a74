"""Each family's own config.json format <-> ModelConfig.

Checkpoints are read as published: no conversion step. Saving writes the family's format, so
what we save loads in the family's reference code too. Every config value the reference
modeling code (LLaDA's configuration_llada / modeling_llada, Dream's configuration_dream on
Qwen2) would compute differently from `DiffusionLM` is refused with the field's name; absent
fields take the reference code's own defaults. Fields that do not change inference (dropouts,
init, flash_attention, block_group_size, precision) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cdlm.models.hub import resolve_model_path

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
        return read_config(resolve_model_path(name_or_path))

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



# Published special ids, used only when a config.json omits them.
LLADA_DEFAULT_MASK_ID = 126336
DREAM_DEFAULT_MASK_ID = 151666


def detect_family(raw: dict[str, Any]) -> str:
    model_type = str(raw.get("model_type", "")).lower()
    architectures = [a.lower() for a in raw.get("architectures") or []]
    if model_type == "llada" or any("llada" in a for a in architectures):
        return "llada"
    if model_type == "dream" or any("dream" in a for a in architectures):
        return "dream"
    raise ValueError(
        f"unsupported checkpoint: model_type={raw.get('model_type')!r}, "
        f"architectures={raw.get('architectures')!r}; expected a LLaDA or Dream config.json")


def _cdlm_block_size(raw: dict[str, Any]) -> int:
    return int(raw.get("cdlm_block_size", raw.get("block_size", 32)))


def _single_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _refuse(family: str, field: str, value: Any, implemented: str) -> ValueError:
    return ValueError(
        f"unsupported {family} config: {field}={value!r} is not implemented ({implemented}); "
        f"refusing to load a model whose logits would differ from the reference code")


def _require(raw: dict[str, Any], family: str, field: str, default: Any, allowed: tuple,
             implemented: str) -> None:
    """The value the family's reference code reads (its own default when absent) must be one
    this model definition computes."""
    value = raw.get(field, default)
    if value not in allowed:
        raise _refuse(family, field, value, implemented)


# LLaDA's configuration_llada.ModelConfig defaults, used when config.json omits a field, and
# the values of each field that `DiffusionLM` computes exactly.
_LLADA_FIELDS: tuple[tuple[str, Any, tuple, str], ...] = (
    ("block_type", "sequential", ("llama",), "only the llama block with separate q/k/v"),
    ("activation_type", "swiglu", ("silu",), "the llama block's gated SiLU"),
    ("layer_norm_type", "default", ("rms",), "RMSNorm only"),
    ("layer_norm_with_affine", True, (True,), "RMSNorm with a weight"),
    ("rope", False, (True,), "rotary position embeddings only"),
    ("alibi", False, (False,), "no ALiBi bias"),
    ("rope_full_precision", True, (True,), "rotation in fp32"),
    ("scale_logits", False, (False,), "unscaled logits"),
    ("input_emb_norm", False, (False,), "no embedding scaling"),
    ("attention_layer_norm", False, (False,), "no q/k norms"),
    ("include_bias", False, (False,), "no biases outside q/k/v"),
    ("clip_qkv", None, (None,), "no q/k/v clipping"),
)


def _llada_kv_heads(raw: dict[str, Any], heads: int) -> int:
    """configuration_llada's effective_n_kv_heads: multi-query attention means one KV head."""
    kv, mqa = raw.get("n_kv_heads"), raw.get("multi_query_attention")
    if mqa is None:
        return int(kv or heads)
    wanted = 1 if mqa else heads
    if kv is not None and int(kv) != wanted:
        raise _refuse("LLaDA", "multi_query_attention", mqa,
                      f"it contradicts n_kv_heads={kv}")
    return wanted


def config_from_llada(raw: dict[str, Any]) -> ModelConfig:
    for field, default, allowed, implemented in _LLADA_FIELDS:
        _require(raw, "LLaDA", field, default, allowed, implemented)
    norm_bias = raw.get("bias_for_layer_norm")
    if (raw.get("include_bias", False) if norm_bias is None else norm_bias):
        raise _refuse("LLaDA", "bias_for_layer_norm", norm_bias, "RMSNorm without a bias")
    tied = bool(raw.get("weight_tying", True))   # the reference default ties
    if "tie_word_embeddings" in raw and bool(raw["tie_word_embeddings"]) != tied:
        raise _refuse("LLaDA", "tie_word_embeddings", raw["tie_word_embeddings"],
                      f"LLaDA reads weight_tying={tied}; the two disagree")
    vocab = int(raw.get("embedding_size") or raw["vocab_size"])
    heads = int(raw["n_heads"])
    hidden = int(raw["d_model"])
    return ModelConfig(
        family="llada",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=int(raw["n_layers"]),
        num_heads=heads,
        num_kv_heads=_llada_kv_heads(raw, heads),
        intermediate_size=int(raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * hidden),
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(raw.get("include_qkv_bias", False)),
        mask_token_id=int(raw.get("mask_token_id", LLADA_DEFAULT_MASK_ID)),
        eos_token_id=_single_id(raw.get("eos_token_id")) or 0,
        pad_token_id=_single_id(raw.get("pad_token_id")),
        max_position_embeddings=int(raw.get("max_sequence_length", 1024)),
        block_size=_cdlm_block_size(raw),
        tie_word_embeddings=tied,
        source_config=dict(raw),
    )


def _default_rope(scaling: Any) -> bool:
    if scaling is None:
        return True
    return isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default"


def config_from_dream(raw: dict[str, Any]) -> ModelConfig:
    _require(raw, "Dream", "hidden_act", "silu", ("silu",), "the gated SiLU MLP")
    if not _default_rope(raw.get("rope_scaling")):
        raise _refuse("Dream", "rope_scaling", raw.get("rope_scaling"), "plain RoPE only")
    if raw.get("use_sliding_window", False):
        raise _refuse("Dream", "use_sliding_window", raw["use_sliding_window"],
                      "full attention in every layer")
    _require(raw, "Dream", "mlp_bias", False, (False,), "an MLP without biases")
    heads = int(raw["num_attention_heads"])
    return ModelConfig(
        family="dream",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads", 32)),
        intermediate_size=int(raw["intermediate_size"]),
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        qkv_bias=True,  # Qwen2 layout: q/k/v always carry a bias
        mask_token_id=int(raw.get("mask_token_id", DREAM_DEFAULT_MASK_ID)),
        eos_token_id=_single_id(raw.get("eos_token_id")) or 0,
        pad_token_id=_single_id(raw.get("pad_token_id")),
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        block_size=_cdlm_block_size(raw),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        source_config=dict(raw),
    )


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    family = detect_family(raw)
    return config_from_llada(raw) if family == "llada" else config_from_dream(raw)


def read_config(path: Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory's config.json."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json")
    return config_from_dict(json.loads(config_file.read_text()))


def config_to_dict(config: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """The family's own config.json for `config` (keeps unknown keys of the source config)."""
    out = dict(config.source_config)
    if config.family == "llada":
        out.update({
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "d_model": config.hidden_size,
            "n_layers": config.num_layers,
            "n_heads": config.num_heads,
            "n_kv_heads": config.num_kv_heads,
            "mlp_hidden_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "embedding_size": config.vocab_size,
            "max_sequence_length": config.max_position_embeddings,
            "rope": True,
            "rope_theta": config.rope_theta,
            "rms_norm_eps": config.norm_eps,
            "layer_norm_type": "rms",
            "activation_type": "silu",
            "block_type": "llama",
            "include_bias": False,
            "include_qkv_bias": config.qkv_bias,
            "weight_tying": config.tie_word_embeddings,
            "mask_token_id": config.mask_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
        })
    else:
        out.update({
            "architectures": ["DreamModel"],
            "model_type": "Dream",
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "num_key_value_heads": config.num_kv_heads,
            "intermediate_size": config.intermediate_size,
            "hidden_act": "silu",
            "vocab_size": config.vocab_size,
            "max_position_embeddings": config.max_position_embeddings,
            "rope_theta": config.rope_theta,
            "rms_norm_eps": config.norm_eps,
            "tie_word_embeddings": config.tie_word_embeddings,
            "mask_token_id": config.mask_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
        })
    out["torch_dtype"] = torch_dtype
    out["cdlm_block_size"] = config.block_size
    return out
