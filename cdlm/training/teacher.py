"""Stage `teacher` (small world only): a tiny LLaDA-layout teacher trained from scratch.

Objective: LLaDA's SFT masked-diffusion loss. Per sequence t ~ U(0, 1]; every answer position
(end-of-text padding included, as LLaDA does) is masked with probability t; cross-entropy on the
masked positions weighted 1/t; the prompt is never masked; attention is fully bidirectional.

One addition, `blockwise_prob` of the batches: the states the naive block-wise policy actually
visits (blocks before the current one complete, the current block masked at ratio t, every
later block fully masked). LLaDA learns those from uniform masking at 8B scale; a model of a
million parameters trained for minutes on CPU reaches the accuracy target sooner when a share
of its batches looks like inference. The teacher is then used purely bidirectionally.

Weighting. LLaDA weights each masked token's cross-entropy by 1/t (the ELBO). With a batch of 32
rows on a model this small, the rows with small t (one or two masked tokens, weight up to 1000)
dominate the clipped gradient and Adam's second moment, and learning stalls: measured here, the
1/t run had not learned to copy names from the prompt after 500 steps (6% accuracy). The world
therefore trains with `weighting="mean"` (same masking process, mean CE over masked tokens, the
MaskGIT/BERT-style estimator); `inverse_t` remains the default of the stage for real teachers.

Saved with `cdlm.models.loader.save_pretrained`: a real LLaDA checkpoint (config.json in the
family's format + safetensors) with the tokenizer files beside it.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cdlm.config import ModelConfig
from cdlm.models.loader import save_pretrained
from cdlm.models.transformer import DiffusionLM
from cdlm.attention import block_causal_mask
from cdlm.tokenizer import Tokenizer
from cdlm.training.checkpoint import load_state, rng_state, save_state, set_rng_state
from cdlm.training.data import Example, collate_sft, encode_example
from cdlm.training.io_utils import append_jsonl, atomic_write_json, read_jsonl
from cdlm.training.losses import masked_diffusion_loss, random_answer_mask, sample_mask_ratio
from cdlm.training.schedule import warmup_cosine_lr

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class TeacherConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    # Declared context. Training sequences are under 128 tokens; RoPE has no learned positions,
    # so longer requests run (with degraded quality), as servers and clients expect.
    max_position_embeddings: int = 1024
    block_size: int = 32
    gen_len: int = 64
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    blockwise_prob: float = 0.5
    # "inverse_t": LLaDA's ELBO weight 1/t per masked token. "mean": plain mean CE over the
    # masked tokens (same masking). See the module doc for why the world uses "mean".
    weighting: str = "inverse_t"
    seed: int = 0
    ckpt_every: int = 100
    log_every: int = 10


def model_config(cfg: TeacherConfig, tokenizer: Tokenizer) -> ModelConfig:
    ids = {name: tokenizer.token_to_id(tok) for name, tok in
           (("mask", "<|mdm_mask|>"), ("eos", "<|endoftext|>"), ("pad", "<|pad|>"))}
    return ModelConfig(
        family="llada", vocab_size=tokenizer.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, rope_theta=cfg.rope_theta, norm_eps=1e-5,
        qkv_bias=False, mask_token_id=ids["mask"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"], max_position_embeddings=cfg.max_position_embeddings,
        block_size=cfg.block_size)


def blockwise_mask(answer_mask: torch.Tensor, prompt_lens: torch.Tensor, t: torch.Tensor,
                   block_size: int, gen_len: int, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A semi-autoregressive state per row: (masked [b, s] bool, current-block [b, s] bool)."""
    batch, seq = answer_mask.shape
    num_blocks = -(-gen_len // block_size)
    current = torch.randint(0, num_blocks, (batch,), generator=generator)
    pos = torch.arange(seq)[None, :] - prompt_lens[:, None]                 # answer offset
    block_of = torch.div(pos, block_size, rounding_mode="floor")
    in_current = (block_of == current[:, None]) & answer_mask
    later = (block_of > current[:, None]) & answer_mask
    u = torch.rand((batch, seq), generator=generator)
    masked = (in_current & (u < t[:, None])) | later
    return masked, in_current


def sft_loss(model: DiffusionLM, examples: list[Example], cfg: TeacherConfig, pad_id: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The masked-diffusion loss of one batch (uniform or block-wise states, see module doc)."""
    batch = collate_sft(examples, pad_id)
    t = sample_mask_ratio(len(examples), generator)
    masked = random_answer_mask(batch.answer_mask, t, generator)
    if cfg.weighting == "inverse_t":
        weights = (1.0 / t)[:, None].expand_as(masked).clone()
    elif cfg.weighting == "mean":
        weights = torch.ones_like(masked, dtype=torch.float)
    else:
        raise ValueError(f"unknown weighting {cfg.weighting!r}")
    n_block = int(round(cfg.blockwise_prob * len(examples)))
    if n_block:
        bm, current = blockwise_mask(batch.answer_mask[:n_block], batch.prompt_lens[:n_block],
                                     t[:n_block], cfg.block_size, cfg.gen_len, generator)
        masked[:n_block] = bm
        # Later blocks are masked with certainty, not at ratio t: weight 1 there.
        weights[:n_block] = torch.where(current, weights[:n_block], torch.ones_like(bm, dtype=torch.float))
    inputs = torch.where(masked, model.config.mask_token_id, batch.input_ids)
    segments = torch.zeros_like(inputs)
    attn = block_causal_mask(segments, segments, batch.valid)   # full attention, padding hidden
    logits = model.logits(model(inputs, attention_mask=attn))
    if cfg.weighting == "mean":
        # Every masked token of the batch counts once, whatever its row's ratio.
        ce = torch.nn.functional.cross_entropy(logits.float()[masked], batch.input_ids[masked])
        return ce
    return masked_diffusion_loss(logits, batch.input_ids, masked, weights, batch.answer_mask)


def train_teacher(data_files: list[Path], tokenizer_dir: Path, out_dir: Path,
                  cfg: TeacherConfig, eval_fn=None, eval_every: int = 0) -> Path:
    """Train (or resume) and save the LLaDA-layout teacher to out_dir/model. Returns that dir."""
    final = out_dir / "model"
    if (final / "config.json").exists():
        return final
    torch.manual_seed(cfg.seed)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    mcfg = model_config(cfg, tokenizer)
    rows = [r for f in data_files for r in read_jsonl(f)]
    examples = [encode_example(tokenizer, r, cfg.gen_len, mcfg.eos_token_id) for r in rows]
    model = DiffusionLM(mcfg)
    _init_weights(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98),
                            weight_decay=cfg.weight_decay)
    state_path = out_dir / "state.pt"
    state = load_state(state_path)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start = state["step"]
    atomic_write_json(out_dir / "config.json", asdict(cfg))
    sampler = random.Random(f"{cfg.seed}:{start}")
    log = out_dir / "log.jsonl"
    t0 = time.time()
    model.train()
    for step in range(start, cfg.steps):
        lr = warmup_cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = sampler.sample(examples, cfg.batch_size)
        loss = sft_loss(model, batch, cfg, mcfg.pad_token_id or 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % cfg.log_every == 0:
            append_jsonl(log, {"step": done, "loss": round(loss.item(), 5),
                               "lr": lr, "elapsed_s": round(time.time() - t0, 1)})
        if eval_fn is not None and eval_every and done % eval_every == 0:
            model.eval()
            append_jsonl(log, {"step": done, "eval": eval_fn(model)})
            model.train()
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            save_state(state_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "rng": rng_state(), "step": done})
    model.eval()
    save_pretrained(model, final)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, final / name)
    return final


def _init_weights(model: DiffusionLM) -> None:
    """Normal init with std 1/sqrt(fan_in) (what std 0.02 amounts to at d=4096), residual
    output projections further scaled by 1/sqrt(2 * depth). At d=128 the GPT-2 constant 0.02 is
    4x smaller than that and measured slow here: attention stayed near uniform and the model
    had not learned to copy numbers from the prompt after 300 steps."""
    depth = len(model.layers)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        std = p.shape[1] ** -0.5     # embeddings too: [vocab, d] -> 1/sqrt(d)
        if ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight")):
            std /= math.sqrt(2 * depth)
        torch.nn.init.normal_(p, std=std)
