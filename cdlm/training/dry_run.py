"""`--dry-run`: what a `distill` or `collect` launch needs per GPU and on disk, before launching.

Nothing is loaded but config.json. Parameter counts come from the real model definition built
on PyTorch's meta device (shapes without storage), LoRA included. Activation memory is traced,
not guessed: the student's forward passes of one micro-batch run on the meta device under
`torch.autograd.graph.saved_tensors_hooks`, and every tensor autograd keeps for backward is
counted once (by storage; the frozen weights excluded). Attention is counted as a fused
kernel keeps it (q, k, v, output, log-sum-exp, the mask as a bias: what PyTorch's CPU flash
kernel keeps, and CUDA's memory-efficient kernel); `tests/training/test_dry_run.py` checks
the count against a real CPU step. What PyTorch's math attention would add (L x L
probabilities per layer, if a GPU falls back to it) is stated on its own line. The transient
working set (one layer during the no-grad pass and the backward recomputation, the logits'
gradient) is an estimate; so is compute time (model FLOPs over an assumed throughput).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from cdlm.attention import training_block_causal_mask
from cdlm.config import ModelConfig
from cdlm.models.transformer import DiffusionLM

GiB = 2**30
# A100 SXM bf16 dense peak, and the share of it assumed sustained (estimates only).
A100_BF16_FLOPS = 312e12
ASSUMED_UTILISATION = 0.4


@dataclass(frozen=True)
class StudentShape:
    """The worst-case micro-batch a rank runs: every row as long as the longest prompt allows."""
    rows: int          # rows in one forward pass (micro-batch)
    y_len: int         # prompt + blocks up to and including the sampled block
    positions: int     # distillation + consistency positions per row (at most one block)
    dlm_len: int       # prompt + reference answer window


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def meta_student(config: ModelConfig, lora_r: int, lora_alpha: int, base_dtype: str,
                 gradient_checkpointing: bool):
    """The peft student on the meta device (no memory): same modules as `make_student`."""
    from peft import get_peft_model

    from cdlm.training.distill import DistillConfig, lora_config

    with torch.device("meta"):
        base = DiffusionLM(config).to(_dtype(base_dtype))
        for p in base.parameters():
            p.requires_grad_(False)
        base.gradient_checkpointing = gradient_checkpointing
        cfg = DistillConfig(lora_r=lora_r, lora_alpha=lora_alpha)
        return get_peft_model(base, lora_config(config.family, cfg))


class SavedTensorCounter:
    """Bytes autograd saves for backward, each storage once, parameters excluded."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._params = [p.untyped_storage() for p in model.parameters()]
        self._seen: list = []       # storages kept alive so identity comparisons stay valid
        self.total = 0

    def _known(self, storage) -> bool:
        if storage.device.type == "meta":     # no addresses: the storage objects themselves
            return any(storage is s for s in self._params) or any(storage is s for s in self._seen)
        ptr = storage.data_ptr()
        return (any(ptr == s.data_ptr() for s in self._params)
                or any(ptr == s.data_ptr() for s in self._seen))

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if not self._known(storage):
            self._seen.append(storage)
            self.total += storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


class _FusedAttentionMemory(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention during a trace with what a fused kernel
    keeps for backward (PyTorch's CPU flash kernel, CUDA's memory-efficient kernel): q, k, v,
    the output, the log-sum-exp per query, and the boolean mask converted to an additive
    bias. No L x L probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, mask):   # q [b, h, L, d], k/v [b, kv_heads, L, d]
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        saved = [q, k, v, out, lse]
        if mask is not None:
            saved.append(torch.empty(mask.shape, dtype=q.dtype, device=q.device))
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):          # never run: traces do not call backward
        raise NotImplementedError


class _AttentionModel(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            return _FusedAttentionMemory.apply(q, k, v, kwargs.get("attn_mask"))
        return func(*args, **kwargs)


def trace_student_step(model, shape: StudentShape, block_size: int, w_dlm: bool,
                       fused_attention: bool = True) -> int:
    """Bytes saved for backward by one micro-batch of `student_losses`, on
    the meta device. Mirrors student_losses: y forward with grad, y* forward without, the
    KL terms on `positions` gathered rows, then the DLM forward and its full-width logits.
    `fused_attention`: count a fused attention kernel's memory; False: PyTorch's math path."""
    from contextlib import nullcontext

    from cdlm.training.distill import _base
    from cdlm.training.losses import forward_kl, masked_diffusion_loss

    base = _base(model)
    mcfg = base.config
    meta = torch.device("meta")
    prompt_len = max(0, shape.y_len - block_size)
    counter = SavedTensorCounter(model)
    attention = _AttentionModel() if fused_attention else nullcontext()
    ids = torch.zeros(shape.rows, shape.y_len, dtype=torch.long, device=meta)
    mask = training_block_causal_mask(torch.full((shape.rows,), prompt_len), shape.y_len,
                                      block_size).to(meta)
    with counter.hooks(), attention:
        hidden = model(ids, attention_mask=mask)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        gathered = hidden[:, :shape.positions].reshape(-1, hidden.shape[-1])
        logits = base.logits(gathered)
        with torch.no_grad():
            target = base.logits(gathered.detach())
        loss = forward_kl(target, logits).sum()
    saved = counter.total
    if w_dlm:
        dlm_counter = SavedTensorCounter(model)
        dlm_counter._seen = list(counter._seen)
        ids = torch.zeros(shape.rows, shape.dlm_len, dtype=torch.long, device=meta)
        mask = training_block_causal_mask(torch.full((shape.rows,), prompt_len),
                                          shape.dlm_len, block_size).to(meta)
        attention = _AttentionModel() if fused_attention else nullcontext()
        with dlm_counter.hooks(), attention:
            hidden = model(ids, attention_mask=mask)
            if mcfg.prediction_shift:
                hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
            logits = base.logits(hidden)
            answer = torch.ones(shape.rows, shape.dlm_len, dtype=torch.bool, device=meta)
            weights = torch.ones(shape.rows, 1, device=meta).expand(-1, shape.dlm_len)
            loss = loss + masked_diffusion_loss(logits, ids, answer, weights, answer)
        saved += dlm_counter.total
    return saved


@dataclass
class DistillPlan:
    family: str
    layers: int
    base_params: int
    lora_params: int
    base_bytes: int
    lora_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    allreduce_bytes: int
    activation_bytes: int       # saved for backward, fused attention
    math_attention_extra: int   # what PyTorch's math attention would add
    checkpoint_input_bytes: int
    transient_bytes: int
    pool_bytes: int
    shard_bytes: int
    processes: int
    batch_size: int
    rows_per_rank: int
    micro_batch: int
    passes_per_step: int
    steps: int
    trajectories: int
    shape: StudentShape
    flops_per_step: float

    @property
    def gpu_total(self) -> int:
        return (self.base_bytes + self.lora_bytes + self.grad_bytes + self.optimizer_bytes
                + self.allreduce_bytes + self.activation_bytes + self.checkpoint_input_bytes
                + self.transient_bytes)


def plan_distill(config: ModelConfig, cfg, processes: int, trajectories: int, gen_len: int,
                 block_size: int, prompt_tokens: int, shard_bytes: int,
                 base_dtype: str) -> DistillPlan:
    """Per-GPU memory and step plan of `distill` with DistillConfig `cfg` on `processes` ranks."""
    from cdlm.training.distill import optimizer_steps

    rows_per_rank = -(-cfg.batch_size // processes)
    micro = min(cfg.micro_batch_size or rows_per_rank, rows_per_rank)
    shape = StudentShape(rows=micro, y_len=prompt_tokens + gen_len, positions=block_size,
                         dlm_len=prompt_tokens + gen_len)
    # Layers are identical: trace 1 and 2 of them, extrapolate (exact) to all.
    fused_layer, fused_rest = _layer_and_rest(config, cfg, shape, block_size, base_dtype, True)
    math_layer, math_rest = _layer_and_rest(config, cfg, shape, block_size, base_dtype, False)
    layers_held = 1 if cfg.gradient_checkpointing else config.num_layers
    saved = fused_rest + layers_held * fused_layer
    math_extra = (math_rest + layers_held * math_layer) - saved
    model = meta_student(config, cfg.lora_r, cfg.lora_alpha, base_dtype, False)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    act_size = torch.empty(0, dtype=_dtype(base_dtype)).element_size()
    checkpoint_inputs = 0
    if cfg.gradient_checkpointing:
        # Each layer's input stays alive in both grad forwards (y and DLM); one layer at a
        # time is recomputed (counted once above).
        passes = 2 if cfg.w_dlm else 1
        checkpoint_inputs = (passes * config.num_layers * micro * shape.y_len
                             * config.hidden_size * act_size)
    logits_grad = micro * shape.dlm_len * config.vocab_size * 4 if cfg.w_dlm else 0
    return DistillPlan(
        family=config.family, layers=config.num_layers, base_params=base, lora_params=lora,
        base_bytes=base * act_size, lora_bytes=lora * 4, grad_bytes=lora * 4,
        optimizer_bytes=2 * lora * 4, allreduce_bytes=lora * 4 if processes > 1 else 0,
        activation_bytes=saved, math_attention_extra=max(0, math_extra),
        checkpoint_input_bytes=checkpoint_inputs, transient_bytes=fused_layer + logits_grad,
        pool_bytes=cfg.max_shards * shard_bytes, shard_bytes=shard_bytes, processes=processes,
        batch_size=cfg.batch_size, rows_per_rank=rows_per_rank, micro_batch=micro,
        passes_per_step=-(-rows_per_rank // micro), steps=optimizer_steps(cfg, trajectories),
        trajectories=trajectories, shape=shape,
        flops_per_step=distill_flops_per_step(config, base, cfg, prompt_tokens, gen_len,
                                              block_size))


def _layer_and_rest(config: ModelConfig, cfg, shape: StudentShape, block_size: int,
                    base_dtype: str, fused: bool) -> tuple[int, int]:
    """Saved bytes (one layer, everything outside the layers) of one micro-batch."""
    totals = []
    for layers in (1, 2):
        model = meta_student(replace(config, num_layers=layers), cfg.lora_r, cfg.lora_alpha,
                             base_dtype, False)
        totals.append(trace_student_step(model, shape, block_size, bool(cfg.w_dlm), fused))
    per_layer = totals[1] - totals[0]
    return per_layer, totals[0] - per_layer


def forward_flops(config: ModelConfig, matmul_params: int, tokens: int, seq: int) -> float:
    """2 FLOPs per weight per token, plus attention's two L x L matmuls."""
    attention = 4 * seq * config.hidden_size * config.num_layers
    return tokens * (2 * matmul_params + attention)


def distill_flops_per_step(config: ModelConfig, base_params: int, cfg, prompt_tokens: int,
                           gen_len: int, block_size: int) -> float:
    """Model FLOPs of one optimizer step at mean lengths: the y pass (forward + backward
    through the frozen base, about 2x forward; 3x with recomputation), the y* pass
    (forward), the DLM pass (like y). lm_head FLOPs of the gathered positions are included
    in the matmul params (an upper bound)."""
    body = base_params - config.vocab_size * config.hidden_size   # embedding lookup is free
    y_len = prompt_tokens + gen_len // 2 + block_size // 2
    dlm_len = prompt_tokens + gen_len
    grad_factor = 3 if cfg.gradient_checkpointing else 2
    flops = cfg.batch_size * forward_flops(config, body, y_len, y_len) * (grad_factor + 1)
    if cfg.w_dlm:
        flops += cfg.batch_size * forward_flops(config, body, dlm_len, dlm_len) * grad_factor
    return flops


def format_distill_plan(plan: DistillPlan, gpu_gib: float) -> str:
    g = lambda b: f"{b / GiB:8.2f} GiB"    # noqa: E731
    fits = plan.gpu_total <= gpu_gib * GiB
    est_s = plan.steps * plan.flops_per_step / (plan.processes * A100_BF16_FLOPS
                                                 * ASSUMED_UTILISATION)
    lines = [
        f"distill dry run: {plan.family}, {plan.layers} layers, "
        f"{plan.base_params / 1e9:.2f}B frozen parameters, LoRA {plan.lora_params / 1e6:.1f}M",
        f"global batch {plan.batch_size} over {plan.processes} process(es): {plan.rows_per_rank}"
        f" rows per rank, micro-batch {plan.micro_batch} ({plan.passes_per_step} forward/"
        f"backward pass(es) per optimizer step)",
        f"optimizer steps: {plan.steps} ({plan.trajectories} trajectories)",
        f"worst-case rows: y {plan.shape.y_len} tokens, DLM {plan.shape.dlm_len} tokens",
        "per GPU:",
        f"  base weights (frozen)              {g(plan.base_bytes)}",
        f"  LoRA weights (fp32)                {g(plan.lora_bytes)}",
        f"  LoRA gradients (fp32)              {g(plan.grad_bytes)}",
        f"  AdamW moments (fp32, 2 per weight) {g(plan.optimizer_bytes)}",
        f"  gradient all-reduce buffer         {g(plan.allreduce_bytes)}",
        f"  activations saved for backward     {g(plan.activation_bytes)}  (fused attention)",
        f"  checkpointed layer inputs          {g(plan.checkpoint_input_bytes)}",
        f"  transient working set (estimate)   {g(plan.transient_bytes)}",
        f"  total                              {g(plan.gpu_total)}  of {gpu_gib:.0f} GiB: "
        + ("fits" if fits else "does NOT fit (lower --micro-batch-size, or "
           "--gradient-checkpointing true)"),
        f"  (math attention instead of a fused kernel would add {plan.math_attention_extra / GiB:.2f}"
        " GiB)",
        "host memory per process:",
        f"  trajectory pool                    {g(plan.pool_bytes)}  (--max-shards x "
        f"{plan.shard_bytes / 2**20:.0f} MiB shards)",
        f"compute: {plan.flops_per_step / 1e15:.1f} PFLOP per optimizer step; estimate at "
        f"{ASSUMED_UTILISATION:.0%} of A100 bf16 peak on {plan.processes} GPU(s): "
        f"{est_s / 3600:.1f} h (an estimate, not a measurement)",
    ]
    return "\n".join(lines)


@dataclass
class CollectPlan:
    prompts: int
    skipped: int
    chunk_size: int
    shards: int
    shard_bytes: int
    disk_bytes: int
    weight_bytes: int
    working_bytes: int
    processes: int
    flops: float


def plan_collect(config: ModelConfig, cfg, prompt_lens: list[int], skipped: int,
                 processes: int, weight_dtype: str) -> CollectPlan:
    from cdlm.training.collect import effective_chunk_size, record_bytes

    longest = max(prompt_lens)
    chunk = effective_chunk_size(cfg, config.hidden_size, longest)
    disk = sum(record_bytes(cfg, config.hidden_size, p) for p in prompt_lens)
    with torch.device("meta"):
        params = sum(p.numel() for p in DiffusionLM(config).parameters())
    size = torch.empty(0, dtype=_dtype(weight_dtype)).element_size()
    width = longest + cfg.gen_len
    # One batch in flight: a layer's activations (MLP is the widest), the recorded hidden
    # states in fp32, the current block's logits.
    working = (cfg.batch_size * width * (config.hidden_size * 4 + config.intermediate_size * 3)
               * size + cfg.batch_size * cfg.gen_len * config.hidden_size * 4
               + cfg.batch_size * cfg.block_size * config.vocab_size * 4)
    body = params - config.vocab_size * config.hidden_size
    mean_width = sum(prompt_lens) / len(prompt_lens) + cfg.gen_len
    # The naive policy: one full-sequence forward per generated token (no cache).
    flops = len(prompt_lens) * cfg.gen_len * forward_flops(config, body, int(mean_width),
                                                           int(mean_width))
    return CollectPlan(prompts=len(prompt_lens), skipped=skipped, chunk_size=chunk,
                       shards=math.ceil(len(prompt_lens) / chunk),
                       shard_bytes=chunk * record_bytes(cfg, config.hidden_size, longest),
                       disk_bytes=disk, weight_bytes=params * size, working_bytes=working,
                       processes=processes, flops=flops)


def _size(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_collect_plan(plan: CollectPlan) -> str:
    est_s = plan.flops / (plan.processes * A100_BF16_FLOPS * ASSUMED_UTILISATION)
    return "\n".join([
        f"collect dry run: {plan.prompts} prompts ({plan.skipped} skipped by the prompt-length "
        f"filter), {plan.shards} shards of up to {plan.chunk_size} trajectories",
        f"disk: {_size(plan.disk_bytes)} of trajectories (at most {_size(plan.shard_bytes)} "
        "per shard)",
        f"per GPU: teacher weights {plan.weight_bytes / GiB:.2f} GiB + decoding working set "
        f"about {plan.working_bytes / GiB:.2f} GiB (an estimate)",
        f"compute: {plan.flops / 1e15:.0f} PFLOP (every generated token re-runs the whole "
        f"sequence); estimate at {ASSUMED_UTILISATION:.0%} of A100 bf16 peak on "
        f"{plan.processes} GPU(s): {est_s / 3600:.1f} h upper bound (early stops at the end "
        "token shorten it; an estimate, not a measurement)",
    ])
