"""Stage `distill`: the block-causal CDLM student (SPEC section 3).

Student = frozen teacher weights + peft LoRA on the attention and MLP projections of every
layer (never the lm_head: LLaDA's `ff_out` name also matches `model.transformer.ff_out`, so the
targets are a regex anchored on the layer path). Trained under the block-causal mask of
`cdlm.attention` (the function the engine's masks are built from).

One training example = one trajectory, one block b of it, and two states of that block taken
from the teacher's own decoding order:
  y   the block after the teacher's first s steps in it (at least one position still masked),
  y*  a more informed state: the block after s* > s steps, s* uniform up to the completion.
The paper's text names the completion as y*; we draw s* uniformly up to it (the completion
included) because with y* = completion the consistency term would have no still-masked
positions to act on. Context: the prompt and the teacher's finished blocks < b; later blocks
are dropped (block-causal attention cannot see them anyway).
Losses (weights default to the paper's LLaDA values 1.0 / 0.5 / 0.1):
  distill  forward KL(teacher at finalisation || student at y) on positions finalised in [s, s*)
  cons     KL(student at y*, stop-gradient || student at y) on positions still masked in y*
  dlm      LLaDA's masked-diffusion CE on the reference answer, random ratio, block-causal
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cdlm.attention import training_block_causal_mask
from cdlm.models.loader import load_model
from training.checkpoint import load_state, rng_state, save_state, set_rng_state
from training.io_utils import append_jsonl, atomic_write_json, replace_dir, tmp_dir_next_to
from training.losses import (consistency_loss, distillation_loss, masked_diffusion_loss,
                             random_answer_mask, sample_mask_ratio)
from training.schedule import warmup_cosine_lr
from training.trajectories import Trajectory, TrajectoryPool, read_index

# LoRA targets per family: every attention and MLP projection inside a layer, nothing else.
LORA_TARGETS = {
    "llada": r".*\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)",
    "dream": r".*\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)"
             r"|mlp\.(gate_proj|up_proj|down_proj))",
}


@dataclass
class DistillConfig:
    lora_r: int = 32
    lora_alpha: int = 32
    steps: int = 1000
    batch_size: int = 16
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


@dataclass
class BlockExample:
    """Inputs of one (trajectory, block, y, y*) sample, truncated after block b."""
    y: torch.Tensor             # [L] ids: prompt, finished blocks, block b at state y
    y_star: torch.Tensor        # [L] ids: same with block b at state y*
    prompt_len: int
    newly: torch.Tensor         # [L] bool: finalised between y and y* (distillation positions)
    still: torch.Tensor         # [L] bool: masked in y* (consistency positions)
    teacher_hidden: torch.Tensor  # [n_newly, D] in position order
    answer_ids: torch.Tensor    # reference answer (for the DLM loss)


def lora_config(family: str, cfg: DistillConfig):
    from peft import LoraConfig
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                      target_modules=LORA_TARGETS[family], bias="none")


def make_student(base_dir: Path, cfg: DistillConfig, device: str = "cpu"):
    """The peft-wrapped student: base frozen, LoRA trainable."""
    from peft import get_peft_model
    base = load_model(base_dir, dtype="float32", device=device)
    for p in base.parameters():
        p.requires_grad_(False)
    model = get_peft_model(base, lora_config(base.config.family, cfg))
    return model


def decoded_blocks(traj: Trajectory, block_size: int) -> list[int]:
    """Blocks with at least one finalised position (the ones a student state can come from)."""
    n = -(-traj.steps.shape[0] // block_size)
    return [b for b in range(n) if (traj.steps[b * block_size:(b + 1) * block_size] >= 0).any()]


def block_example(traj: Trajectory, block: int, block_size: int, mask_id: int,
                  rng: random.Random) -> BlockExample:
    """Draw y and y* inside `block` from the teacher's finalisation order (see module doc)."""
    lo, hi = block * block_size, min((block + 1) * block_size, traj.steps.shape[0])
    steps = traj.steps[lo:hi]
    decided = steps >= 0
    order = sorted(set(steps[decided].tolist()))           # the block's step ids, ascending
    s_idx = rng.randrange(len(order))                      # y: steps order[:s_idx] applied
    s_star_idx = rng.randint(s_idx + 1, len(order))        # y*: steps order[:s_star_idx] applied
    s = order[s_idx]
    s_star = order[s_star_idx] if s_star_idx < len(order) else math.inf
    tokens = traj.tokens[lo:hi]
    in_y = decided & (steps < s)
    in_y_star = decided & (steps < s_star)
    prefix = torch.cat([traj.prompt_ids, traj.tokens[:lo]])
    y_block = torch.where(in_y, tokens, torch.full_like(tokens, mask_id))
    y_star_block = torch.where(in_y_star, tokens, torch.full_like(tokens, mask_id))
    pad = torch.zeros(prefix.shape[0], dtype=torch.bool)
    newly_block = in_y_star & ~in_y
    still_block = decided & ~in_y_star
    return BlockExample(
        y=torch.cat([prefix, y_block]), y_star=torch.cat([prefix, y_star_block]),
        prompt_len=traj.prompt_ids.shape[0],
        newly=torch.cat([pad, newly_block]), still=torch.cat([pad, still_block]),
        teacher_hidden=traj.hidden[lo:hi][newly_block].float(), answer_ids=traj.answer_ids)


def _pad_stack(rows: list[torch.Tensor], value) -> torch.Tensor:
    width = max(r.shape[0] for r in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out


def student_losses(model, examples: list[BlockExample], block_size: int, cfg: DistillConfig,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The three CDLM losses of a batch and their weighted total."""
    base = _base(model)
    mcfg = base.config
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
    teacher_hidden = torch.cat([e.teacher_hidden for e in examples]).to(device)
    with torch.no_grad():
        teacher_logits = base.logits(teacher_hidden)
        target_cons = base.logits(_at(hidden_star, still, shift))
    l_distill = distillation_loss(teacher_logits, logits_y[sel_newly])
    l_cons = consistency_loss(logits_y[~sel_newly], target_cons)
    l_dlm = dlm_loss(model, examples, block_size, generator) if cfg.w_dlm else l_distill * 0
    total = cfg.w_distill * l_distill + cfg.w_cons * l_cons + cfg.w_dlm * l_dlm
    return {"loss": total, "distill": l_distill, "cons": l_cons, "dlm": l_dlm}


def _at(hidden: torch.Tensor, where: torch.Tensor, shift: int) -> torch.Tensor:
    """Hidden states that predict the positions in `where` (row-major order); Dream reads
    position i from hidden state i-1."""
    rows, cols = where.nonzero(as_tuple=True)
    return hidden[rows, cols - shift]


def dlm_loss(model, examples: list[BlockExample], block_size: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Masked-diffusion CE on prompt + reference answer under the block-causal mask."""
    base = _base(model)
    mcfg = base.config
    device = next(model.parameters()).device
    rows = [torch.cat([e.y[:e.prompt_len], e.answer_ids]) for e in examples]
    lens = torch.tensor([r.shape[0] for r in rows])
    ids = _pad_stack(rows, mcfg.eos_token_id)
    prompt_lens = torch.tensor([e.prompt_len for e in examples])
    pos = torch.arange(ids.shape[1])[None, :]
    answer = (pos >= prompt_lens[:, None]) & (pos < lens[:, None])
    t = sample_mask_ratio(len(examples), generator)
    masked = random_answer_mask(answer, t, generator)
    inputs = torch.where(masked, mcfg.mask_token_id, ids)
    mask = training_block_causal_mask(prompt_lens, ids.shape[1], block_size, pos < lens[:, None])
    hidden = model(inputs.to(device), attention_mask=mask.to(device))
    if mcfg.prediction_shift:
        hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
    logits = base.logits(hidden)
    weights = (1.0 / t)[:, None].expand_as(masked).to(device)
    return masked_diffusion_loss(logits, ids.to(device), masked.to(device), weights,
                                 answer.to(device))


def _base(model):
    """The DiffusionLM under peft / accelerate wrappers."""
    while not hasattr(model, "logits"):
        model = model.module if hasattr(model, "module") else model.get_base_model()
    return model


def check_complete(root: Path) -> dict:
    index = read_index(root)
    if not index["complete"]:
        raise RuntimeError(f"{root}: collection incomplete ({len(index['shards'])} of "
                           f"{index['num_chunks']} shards); rerun collect to finish it")
    return index


def distill(base_dir: Path, traj_dir: Path, out_dir: Path, cfg: DistillConfig) -> Path:
    """Train (or resume) the student; save the peft adapter to out_dir/adapter."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    final = out_dir / "adapter"
    if (final / "adapter_config.json").exists():
        return final
    accelerator = Accelerator(cpu=cfg.device == "cpu")
    index = check_complete(traj_dir)
    block_size = int(index["block_size"])
    torch.manual_seed(cfg.seed)
    model = make_student(base_dir, cfg, device=str(accelerator.device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    state_path = out_dir / "state.pt"
    start = 0
    state = load_state(state_path)
    if state is not None:
        lora_params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        for name, value in state["lora"].items():
            lora_params[name].data.copy_(value)
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start = state["step"]
    model, opt = accelerator.prepare(model, opt)
    if accelerator.is_main_process:
        atomic_write_json(out_dir / "config.json", {**asdict(cfg), "block_size": block_size,
                                                    "base": str(base_dir), "trajectories": str(traj_dir)})
    rng = random.Random(f"{cfg.seed}:{accelerator.process_index}:{start}")
    pool = TrajectoryPool(traj_dir, cfg.max_shards,
                          rng=random.Random(f"pool:{cfg.seed}:{accelerator.process_index}"))
    mask_id = _base(model).config.mask_token_id
    log = out_dir / "log.jsonl"
    t0 = time.time()
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="distill",
               disable=not accelerator.is_main_process)
    for step in bar:
        lr = warmup_cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        picks = [pool.draw(rng) for _ in range(cfg.batch_size)]
        examples = [block_example(t, rng.choice(decoded_blocks(t, block_size)), block_size,
                                  mask_id, rng) for t in picks]
        losses = student_losses(model, examples, block_size, cfg)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(losses["loss"])
        accelerator.clip_grad_norm_(trainable, 1.0)
        opt.step()
        done = step + 1
        if accelerator.is_main_process and done % cfg.log_every == 0:
            row = {"step": done, **{k: round(v.item(), 5) for k, v in losses.items()},
                   "lr": lr, "elapsed_s": round(time.time() - t0, 1)}
            append_jsonl(log, row)
            bar.set_postfix(loss=row["loss"], distill=row["distill"], cons=row["cons"])
        if accelerator.is_main_process and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            unwrapped = accelerator.unwrap_model(model)
            save_state(state_path, {
                "lora": {n: p.detach().cpu() for n, p in unwrapped.named_parameters()
                         if p.requires_grad},
                "optimizer": opt.state_dict(), "rng": rng_state(), "step": done})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_adapter(accelerator.unwrap_model(model), final, base_dir)
    accelerator.wait_for_everyone()
    return final


def save_adapter(model, final: Path, base_dir: Path) -> None:
    """peft's own format (adapter_config.json + adapter_model.safetensors), atomically."""
    tmp = tmp_dir_next_to(final)
    model.save_pretrained(str(tmp))
    replace_dir(tmp, final)
