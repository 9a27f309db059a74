"""Stage `distill`: the block-causal CDLM student (SPEC section 3).

Student = frozen teacher weights + peft LoRA on the attention and MLP projections of every
layer (never the lm_head: LLaDA's `ff_out` name also matches `model.transformer.ff_out`, so the
targets are a regex anchored on the layer path). Trained under the block-causal mask of
`cdlm.attention` (the function the engine's masks are built from). Samples (y, y*) are
described in `training.student_batch`.

Losses (weights default to the paper's LLaDA values 1.0 / 0.5 / 0.1):
  distill  forward KL(teacher at finalisation || student at y) on positions finalised in [s, s*)
  cons     KL(student at y*, stop-gradient || student at y) on positions still masked in y*
  dlm      LLaDA's masked-diffusion CE on the reference answer, random ratio, block-causal

Multi-process (torchrun / accelerate launch): `batch_size` is the global batch. Every rank
draws the same global batch, computes the loss terms of its contiguous share of the rows
(in micro-batches of `micro_batch_size`, accumulating gradients) with the global batch's
denominators, and the ranks' gradients are summed: the optimizer sees the gradient of the
whole batch, as one process computes it, up to float summation order. Every rank keeps the
same optimizer state; rank 0 alone writes checkpoints, logs and the adapter.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cdlm.attention import training_block_causal_mask
from cdlm.models.loader import load_model
from cdlm.training.checkpoint import load_state, rng_state, save_state, set_rng_state
from cdlm.training.dist import (DistInfo, all_reduce_sum, barrier, device_for, dist_info,
                           process_group, rank_share)
from cdlm.training.io_utils import (append_jsonl, atomic_write_json, remove_stale_temporaries,
                               replace_dir, reporting_disk_full, tmp_dir_next_to, truncate_log)
from cdlm.training.losses import (answer_mask_from_noise, consistency_loss, distillation_loss,
                             masked_diffusion_loss)
from cdlm.training.schedule import warmup_cosine_lr
from cdlm.training.student_batch import (BlockExample, DLMNoise, GlobalBatch, LossNorm,  # noqa: F401
                                    block_example, decoded_blocks, draw_global_batch)
from cdlm.training.trajectories import TrajectoryPool, read_index

# LoRA targets per family: every attention and MLP projection inside a layer, nothing else.
LORA_TARGETS = {
    "llada": r".*\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)",
    "dream": r".*\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
             r"|mlp\.(gate_proj|up_proj|down_proj))",
}
LOSS_NAMES = ("loss", "distill", "cons", "dlm")
BASE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class DistillConfig:
    lora_r: int = 32
    lora_alpha: int = 32
    steps: int = 1000
    epochs: float = 0.0      # > 0: steps = ceil(epochs * trajectories / batch_size)
    batch_size: int = 16     # global batch: split across ranks
    micro_batch_size: int = 0  # rows per forward pass on a rank (0 = its whole share)
    lr: float = 1e-3
    warmup: int = 50
    w_distill: float = 1.0
    w_cons: float = 0.5
    w_dlm: float = 0.1
    seed: int = 0
    ckpt_every: int = 100
    log_every: int = 10
    device: str = ""
    max_shards: int = 8      # trajectory shards held in memory at once (see TrajectoryPool)
    base_dtype: str = "auto"  # frozen base weights: auto = bfloat16 on GPUs, float32 on CPU
    gradient_checkpointing: bool = False  # recompute each layer in backward (less memory)
    dist_timeout_s: float = 1800.0  # bound on any collective wait (a dead peer fails the run)

    def __post_init__(self) -> None:
        for name in ("lora_r", "lora_alpha", "steps", "batch_size", "ckpt_every", "log_every",
                     "max_shards"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("micro_batch_size", "warmup", "epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"base_dtype must be one of {BASE_DTYPES}, got {self.base_dtype!r}")
        if self.dist_timeout_s <= 0:
            raise ValueError("dist_timeout_s must be positive")


def optimizer_steps(cfg: DistillConfig, num_trajectories: int) -> int:
    """`steps`, or with `epochs` set: enough steps for that many passes over the trajectories
    (one pass = one sample per trajectory, each sample a random block and pair of states)."""
    if cfg.epochs > 0:
        return max(1, math.ceil(cfg.epochs * num_trajectories / cfg.batch_size))
    return cfg.steps


def lora_config(family: str, cfg: DistillConfig):
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=LORA_TARGETS[family], bias="none")


def base_dtype(cfg: DistillConfig, device: str) -> str:
    if cfg.base_dtype != "auto":
        return cfg.base_dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def make_student(base_dir: Path, cfg: DistillConfig, device: str = "cpu"):
    """The peft-wrapped student: base frozen (in `base_dtype`), LoRA trainable in fp32."""
    from peft import get_peft_model
    base = load_model(base_dir, dtype=base_dtype(cfg, device), device=device)
    for p in base.parameters():
        p.requires_grad_(False)
    base.gradient_checkpointing = cfg.gradient_checkpointing
    # autocast_adapter_dtype (peft's default): LoRA weights stay fp32 on a bf16 base.
    return get_peft_model(base, lora_config(base.config.family, cfg))


def _pad_stack(rows: list[torch.Tensor], value) -> torch.Tensor:
    width = max(r.shape[0] for r in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out


def student_losses(model, examples: list[BlockExample], block_size: int, cfg: DistillConfig,
                   generator: torch.Generator | None = None, norm: LossNorm | None = None,
                   dlm_noise: DLMNoise | None = None) -> dict[str, torch.Tensor]:
    """The three CDLM losses and their weighted total for `examples`.

    `norm` holds the denominators of the global batch these rows belong to (default: these
    rows are the batch); `dlm_noise` the DLM masking of these rows (default: drawn here)."""
    base = _base(model)
    mcfg = base.config
    norm = norm or LossNorm.of(examples)
    device = next(model.parameters()).device
    lens = torch.tensor([e.y.shape[0] for e in examples])
    y = _pad_stack([e.y for e in examples], mcfg.mask_token_id).to(device)
    y_star = _pad_stack([e.y_star for e in examples], mcfg.mask_token_id).to(device)
    newly = _pad_stack([e.newly for e in examples], False).to(device)
    still = _pad_stack([e.still for e in examples], False).to(device)
    valid = (torch.arange(y.shape[1])[None, :] < lens[:, None]).to(device)
    prompt_lens = torch.tensor([e.prompt_len for e in examples], device=device)
    mask = training_block_causal_mask(prompt_lens, y.shape[1], block_size, valid)

    hidden_y = model(y, attention_mask=mask)
    with torch.no_grad():
        hidden_star = model(y_star, attention_mask=mask)
    shift = mcfg.prediction_shift
    logits_y = base.logits(_at(hidden_y, newly | still, shift))
    sel_newly = newly[newly | still]        # which of the gathered rows are newly unmasked
    teacher_hidden = torch.cat([e.teacher_hidden for e in examples]).to(device, hidden_y.dtype)
    with torch.no_grad():
        teacher_logits = base.logits(teacher_hidden)
        target_cons = base.logits(_at(hidden_star, still, shift))
    l_distill = distillation_loss(teacher_logits, logits_y[sel_newly], norm.newly)
    l_cons = consistency_loss(logits_y[~sel_newly], target_cons, norm.still)
    if cfg.w_dlm:
        if dlm_noise is None:
            dlm_noise = DLMNoise.draw(examples, generator)
        l_dlm = dlm_loss(model, examples, block_size, dlm_noise, norm.rows)
    else:
        l_dlm = l_distill * 0
    total = cfg.w_distill * l_distill + cfg.w_cons * l_cons + cfg.w_dlm * l_dlm
    return {"loss": total, "distill": l_distill, "cons": l_cons, "dlm": l_dlm}


def _at(hidden: torch.Tensor, where: torch.Tensor, shift: int) -> torch.Tensor:
    """Hidden states that predict the positions in `where` (row-major order); Dream reads
    position i from hidden state i-1."""
    rows, cols = where.nonzero(as_tuple=True)
    return hidden[rows, cols - shift]


def dlm_loss(model, examples: list[BlockExample], block_size: int, noise: DLMNoise,
             num_rows: int | None = None) -> torch.Tensor:
    """Masked-diffusion CE on prompt + reference answer under the block-causal mask.
    `noise` holds these rows' mask ratios and uniforms (`DLMNoise.rows`).
    The logits are full width ([rows, seq, vocab]): gathering the masked positions first
    would save memory at 7-8B scale (`--dry-run` counts it) but changes float rounding, and
    so every student trained before (the bundled one is reproduced bit for bit)."""
    base = _base(model)
    mcfg = base.config
    device = next(model.parameters()).device
    rows = [torch.cat([e.y[:e.prompt_len], e.answer_ids]) for e in examples]
    lens = torch.tensor([r.shape[0] for r in rows])
    ids = _pad_stack(rows, mcfg.eos_token_id)
    prompt_lens = torch.tensor([e.prompt_len for e in examples])
    pos = torch.arange(ids.shape[1])[None, :]
    answer = (pos >= prompt_lens[:, None]) & (pos < lens[:, None])
    t = noise.t
    masked = answer_mask_from_noise(answer, t, noise.u[:, :ids.shape[1]])
    inputs = torch.where(masked, mcfg.mask_token_id, ids)
    mask = training_block_causal_mask(prompt_lens, ids.shape[1], block_size, pos < lens[:, None])
    hidden = model(inputs.to(device), attention_mask=mask.to(device))
    if mcfg.prediction_shift:
        hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
    logits = base.logits(hidden)
    weights = (1.0 / t)[:, None].expand_as(masked).to(device)
    return masked_diffusion_loss(logits, ids.to(device), masked.to(device), weights,
                                 answer.to(device), num_rows)


def _base(model):
    """The DiffusionLM under peft wrappers."""
    while not hasattr(model, "logits"):
        model = model.module if hasattr(model, "module") else model.get_base_model()
    return model


def check_complete(root: Path) -> dict:
    index = read_index(root)
    if not index["complete"]:
        raise RuntimeError(f"{root}: collection incomplete ({len(index['shards'])} of "
                           f"{index['num_chunks']} shards); rerun collect to finish it")
    return index


def micro_batches(share: range, size: int) -> list[list[int]]:
    """A rank's rows cut into forward passes of at most `size` rows (0 = one pass)."""
    rows = list(share)
    size = size or max(1, len(rows))
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def accumulate_step(model, batch: GlobalBatch, share: range, block_size: int,
                    cfg: DistillConfig) -> torch.Tensor:
    """Forward + backward of this rank's rows of the batch; gradients accumulate in .grad.
    Returns this rank's part of each loss term [len(LOSS_NAMES)] (the parts sum to the
    global batch's values)."""
    parts = torch.zeros(len(LOSS_NAMES))
    for rows in micro_batches(share, cfg.micro_batch_size):
        examples = [batch.examples[i] for i in rows]
        noise = None
        if batch.dlm_noise is not None:
            noise = batch.dlm_noise.rows(rows, max(e.dlm_len for e in examples))
        losses = student_losses(model, examples, block_size, cfg, norm=batch.norm,
                                dlm_noise=noise)
        losses["loss"].backward()
        parts += torch.stack([losses[k].detach().float().cpu() for k in LOSS_NAMES])
    return parts


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Add every rank's gradients (one flat all-reduce): each rank then holds the gradient of
    the whole global batch. A rank with no rows contributes zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    all_reduce_sum(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def broadcast_trainable(params: list[torch.nn.Parameter]) -> None:
    """Every rank starts from rank 0's LoRA weights (they are equal by seeding; this makes it
    independent of how each device initialises)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def distill(base_dir: Path, traj_dir: Path, out_dir: Path, cfg: DistillConfig) -> Path:
    """Train (or resume) the student; save the peft adapter to out_dir/adapter."""
    final = out_dir / "adapter"
    if (final / "adapter_config.json").exists():
        return final                  # finished: write nothing (the output may be read-only)
    info = dist_info()
    device = device_for(info, cfg.device or None)
    with process_group(info, device, cfg.dist_timeout_s):
        return _train(base_dir, traj_dir, out_dir, cfg, info, device)


def _train(base_dir: Path, traj_dir: Path, out_dir: Path, cfg: DistillConfig, info: DistInfo,
           device: str) -> Path:
    from tqdm.auto import tqdm

    index = check_complete(traj_dir)
    block_size = int(index["block_size"])
    total_steps = optimizer_steps(cfg, int(index["num_prompts"]))
    state_path, log = out_dir / "state.pt", out_dir / "log.jsonl"
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
    barrier()                         # nobody reads state.pt while rank 0 tidies
    torch.manual_seed(cfg.seed)
    model = make_student(base_dir, cfg, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    # Seed strings of earlier versions (rank 0, start 0): a fresh run reproduces their output.
    data_rng = random.Random(f"{cfg.seed}:0:0")
    pool_rng = random.Random(f"pool:{cfg.seed}:0")
    start, pool_state = 0, None
    state = load_state(state_path)
    if state is not None:
        lora_params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        for name, value in state["lora"].items():
            lora_params[name].data.copy_(value)
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start = state["step"]
        if "data_rng" in state:
            data_rng.setstate(state["data_rng"])
            pool_state = state["pool"]
        else:   # a checkpoint of an earlier version: its data order cannot be restored
            data_rng = random.Random(f"{cfg.seed}:0:{start}")
    broadcast_trainable(trainable)
    barrier()                         # every rank has read state.pt before it is rewritten
    if info.is_main:
        truncate_log(log, start)      # rows past the checkpoint are about to be redone
        atomic_write_json(out_dir / "config.json", {
            **asdict(cfg), "block_size": block_size, "optimizer_steps": total_steps,
            "world_size": info.world_size, "base": str(base_dir), "trajectories": str(traj_dir)})
    pool = TrajectoryPool(traj_dir, cfg.max_shards, rng=pool_rng, state=pool_state)
    mask_id = _base(model).config.mask_token_id
    share = rank_share(cfg.batch_size, info)
    t0 = time.time()
    model.train()
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc="distill",
               disable=not info.is_main)
    for step in bar:
        lr = warmup_cosine_lr(step, cfg.lr, cfg.warmup, total_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = draw_global_batch(pool, data_rng, cfg.batch_size, block_size, mask_id,
                                  with_dlm=bool(cfg.w_dlm))
        opt.zero_grad(set_to_none=True)
        parts = accumulate_step(model, batch, share, block_size, cfg)
        if info.distributed:
            sum_gradients(trainable)
            all_reduce_sum(parts)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        done = step + 1
        if info.is_main and done % cfg.log_every == 0:
            row = {"step": done, **{k: round(v.item(), 5) for k, v in zip(LOSS_NAMES, parts)},
                   "lr": lr, "elapsed_s": round(time.time() - t0, 1)}
            append_jsonl(log, row)
            bar.set_postfix(loss=row["loss"], distill=row["distill"], cons=row["cons"])
        if info.is_main and (done % cfg.ckpt_every == 0 or done == total_steps):
            save_state(state_path, {
                "lora": {n: p.detach().cpu() for n, p in model.named_parameters()
                         if p.requires_grad},
                "optimizer": opt.state_dict(), "rng": rng_state(), "step": done,
                "data_rng": data_rng.getstate(), "pool": pool.state_dict()})
    barrier()
    if info.is_main:
        save_adapter(model, out_dir / "adapter", base_dir)
    barrier()
    return out_dir / "adapter"


def save_adapter(model, final: Path, base_dir: Path) -> None:
    """peft's own format (adapter_config.json + adapter_model.safetensors), atomically."""
    with reporting_disk_full(final):
        tmp = tmp_dir_next_to(final)
        try:
            model.save_pretrained(str(tmp))
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
