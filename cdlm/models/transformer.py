"""One diffusion-LM definition for both real families (LLaDA and Dream).

The forward pass is written once. Only the *names* of the modules differ per family, and they
mirror the published checkpoints exactly, so that a state dict from the hub loads with no
renaming and a peft adapter's module paths match ours:

  LLaDA: model.transformer.{wte, blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out,
         ff_norm, ff_proj, up_proj, ff_out}, ln_f, ff_out}
  Dream: model.{embed_tokens, layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
         post_attention_layernorm, mlp.{gate,up,down}_proj}, norm}, lm_head
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cdlm.attention import attend
from cdlm.config import ModelConfig
from cdlm.paged_attention import PagedKV


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (both families do), scaled in the activation dtype."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables in fp32: [batch, seq, head_dim] each (halves repeated, NeoX style)."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float()
    inv_freq = 1.0 / (theta ** (exponents / head_dim))                 # [head_dim / 2]
    angles = positions.float()[..., None] * inv_freq                     # [batch, seq, hd/2]
    angles = torch.cat((angles, angles), dim=-1)                         # [batch, seq, hd]
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_fp32: bool
                 ) -> torch.Tensor:
    """Rotate x [batch, seq, heads, head_dim] by positions encoded in cos/sin [batch, seq, hd]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if in_fp32:
        x32 = x.float()
        return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def gated_silu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class LayerOps:
    """The elementwise pieces of a layer. Eager by default; `compiled()` fuses each into one
    kernel with torch.compile (a dozen launches fewer per layer, which matters on a GPU at
    small batch). The matmuls and attention stay outside, so nothing here breaks a graph."""

    norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = rms_norm
    rotary: Callable[..., torch.Tensor] = None  # type: ignore[assignment]
    mlp_gate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = gated_silu

    def __post_init__(self) -> None:
        if self.rotary is None:
            object.__setattr__(self, "rotary", apply_rotary)

    @classmethod
    def compiled(cls) -> "LayerOps":
        def fuse(fn: Callable) -> Callable:
            return torch.compile(fn, dynamic=True, fullgraph=True)
        return cls(norm=fuse(rms_norm), rotary=fuse(apply_rotary), mlp_gate=fuse(gated_silu))


class _Attention(nn.Module):
    """q/k/v/o projections; a container so Dream's `self_attn.*` names come out right."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        kv_dim = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)


class TransformerBlock(nn.Module):
    """Pre-norm attention + gated-SiLU MLP. Subclasses only choose the module names."""

    config: ModelConfig

    # Family-specific accessors (properties, so peft's module replacement is seen at once).
    @property
    def attn_norm_module(self) -> nn.Module: raise NotImplementedError
    @property
    def mlp_norm_module(self) -> nn.Module: raise NotImplementedError
    @property
    def q(self) -> nn.Module: raise NotImplementedError
    @property
    def k(self) -> nn.Module: raise NotImplementedError
    @property
    def v(self) -> nn.Module: raise NotImplementedError
    @property
    def o(self) -> nn.Module: raise NotImplementedError
    @property
    def gate(self) -> nn.Module: raise NotImplementedError
    @property
    def up(self) -> nn.Module: raise NotImplementedError
    @property
    def down(self) -> nn.Module: raise NotImplementedError

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, layer_idx: int, kv: PagedKV | None,
                ops: LayerOps) -> torch.Tensor:
        attn_norm, mlp_norm = self.attn_norm_module, self.mlp_norm_module
        h = ops.norm(x, attn_norm.weight, attn_norm.eps)
        x = x + self._attention(h, cos, sin, mask, layer_idx, kv, ops)
        h = ops.norm(x, mlp_norm.weight, mlp_norm.eps)
        return x + self.down(ops.mlp_gate(self.gate(h), self.up(h)))

    def _attention(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | None, layer_idx: int, kv: PagedKV | None,
                   ops: LayerOps) -> torch.Tensor:
        cfg = self.config
        batch, seq, _ = h.shape
        q = self.q(h).view(batch, seq, cfg.num_heads, cfg.head_dim)
        k = self.k(h).view(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        v = self.v(h).view(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        q = ops.rotary(q, cos, sin, cfg.rope_rotation_in_fp32)
        k = ops.rotary(k, cos, sin, cfg.rope_rotation_in_fp32)
        if kv is not None:   # a packed pass: batch 1, every token of the step in a row
            out = kv.attend(q[0], k[0], v[0], layer_idx)                  # [tokens, heads, hd]
            return self.o(out.reshape(batch, seq, cfg.hidden_size))
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.o(out.transpose(1, 2).reshape(batch, seq, cfg.hidden_size))


class LLaDABlock(TransformerBlock):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        kv_dim = config.num_kv_heads * config.head_dim
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.attn_out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.ff_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ff_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.ff_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    attn_norm_module = property(lambda self: self.attn_norm)
    mlp_norm_module = property(lambda self: self.ff_norm)
    q = property(lambda self: self.q_proj)
    k = property(lambda self: self.k_proj)
    v = property(lambda self: self.v_proj)
    o = property(lambda self: self.attn_out)
    gate = property(lambda self: self.ff_proj)
    up = property(lambda self: self.up_proj)
    down = property(lambda self: self.ff_out)


class DreamBlock(TransformerBlock):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = _Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = _MLP(config)

    attn_norm_module = property(lambda self: self.input_layernorm)
    mlp_norm_module = property(lambda self: self.post_attention_layernorm)
    q = property(lambda self: self.self_attn.q_proj)
    k = property(lambda self: self.self_attn.k_proj)
    v = property(lambda self: self.self_attn.v_proj)
    o = property(lambda self: self.self_attn.o_proj)
    gate = property(lambda self: self.mlp.gate_proj)
    up = property(lambda self: self.mlp.up_proj)
    down = property(lambda self: self.mlp.down_proj)


class _LLaDABackbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        modules: dict[str, nn.Module] = {
            "wte": nn.Embedding(config.vocab_size, config.hidden_size),
            "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.num_layers)),
            "ln_f": RMSNorm(config.hidden_size, config.norm_eps),
        }
        if not config.tie_word_embeddings:
            modules["ff_out"] = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.transformer = nn.ModuleDict(modules)


class _DreamBackbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class DiffusionLM(nn.Module):
    """The mask-predictor network of a diffusion LM (teacher and student alike)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.layer_ops = LayerOps()
        if config.family == "llada":
            self.model = _LLaDABackbone(config)
        else:
            self.model = _DreamBackbone(config)
            if not config.tie_word_embeddings:
                self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def compile_layer_ops(self) -> None:
        """Fuse each layer's elementwise work (norms, rotary, gated SiLU) with torch.compile."""
        self.layer_ops = LayerOps.compiled()

    # --- family-neutral accessors -----------------------------------------------------------
    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.transformer["wte"] if self.config.family == "llada" else self.model.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.transformer["blocks"] if self.config.family == "llada" else self.model.layers

    @property
    def final_norm(self) -> RMSNorm:
        return self.model.transformer["ln_f"] if self.config.family == "llada" else self.model.norm

    @property
    def output_head(self) -> nn.Module | None:
        if self.config.tie_word_embeddings:
            return None
        return self.model.transformer["ff_out"] if self.config.family == "llada" else self.lm_head

    # --- computation ------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,                   # [batch, seq]
        positions: torch.Tensor | None = None,     # [batch, seq]; default 0..seq-1
        attention_mask: torch.Tensor | None = None,  # [batch, 1, seq, keys] bool/additive; None = full
        kv: PagedKV | None = None,                 # a packed pass over the paged pool (batch 1)
    ) -> torch.Tensor:
        """Final-normed hidden states [batch, seq, hidden]. Logits: `self.logits(hidden)`.

        Dense passes (training, the reference and teacher modes) attend under
        `attention_mask`; a packed pass attends through `kv` (cdlm.paged_attention)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed_tokens(input_ids)
        for layer_idx, block in enumerate(self.layers):
            x = block(x, cos, sin, attention_mask, layer_idx, kv, self.layer_ops)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.output_head
        if head is None:
            return F.linear(hidden, self.embed_tokens.weight)
        return head(hidden)
