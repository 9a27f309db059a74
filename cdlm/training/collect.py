"""Stage `collect`: naive-policy teacher trajectories over a prompt set (SPEC section 3).

The teacher decodes bidirectionally, block by block, exactly one token per step (the most
confident masked position of the current block), greedy. For every prompt we store the token
and finalisation step of each generated position, the teacher's last hidden state at each
position's finalisation (logits are `lm_head(hidden)`, far smaller than logits), and the
reference answer.

Prompts (`training.prompts`: JSONL, parquet, `datasets` directories, hub datasets) get the
model's chat template; those longer than `max_prompt_tokens` after it are skipped (the
paper's filter: 512). Work is cut into fixed chunks of prompts; chunk c is shard c. Rank r of
a W-process launch (`torchrun` or `accelerate launch`) takes the chunks with c % W == r, so no
communication is needed, every chunk is decoded in the same batches whatever W is (so W
processes write the same shards as one), and a rerun (any W) skips the shards already on
disk: that is the resume. The chunk size is capped so that a shard stays under
`max_shard_mb`.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from cdlm.models.loader import load_config, load_model, resolve_model_path
from cdlm.tokenizer import Tokenizer
from cdlm.training.data import answer_ids, chat_prompt_ids
from cdlm.training.decode import decode_bidirectional
from cdlm.training.dist import device_for, dist_info
from cdlm.training.io_utils import remove_stale_temporaries
from cdlm.training.prompts import PromptColumns, load_prompt_rows, prompt_messages
from cdlm.training.trajectories import (INDEX, Trajectory, build_index, read_index, save_shard,
                                   shard_name, write_index)

HIDDEN_DTYPES = ("float16", "bfloat16", "float32")
# Settings a collection's shards depend on: a rerun must match them to resume it.
RESUME_KEYS = ("num_prompts", "chunk_size", "gen_len", "block_size", "hidden_dtype",
               "max_prompt_tokens")


@dataclass
class CollectConfig:
    gen_len: int = 64
    block_size: int = 32
    batch_size: int = 32
    chunk_size: int = 256
    max_shard_mb: float = 2048.0  # chunks are cut so that a shard's tensors stay under this
    hidden_dtype: str = "float16"
    limit: int = 0          # 0 = every prompt
    max_prompt_tokens: int = 512  # templated prompts longer than this are skipped (0 = keep all)
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    messages_field: str = ""  # a conversations column (e.g. Bespoke-Stratos' "conversations")
    system_field: str = ""    # its system prompt column, if any (e.g. "system")
    split: str = "train"      # split of a dataset directory or hub dataset
    device: str = ""        # "" = cuda:LOCAL_RANK when available, else cpu
    dtype: str = "auto"     # teacher weights: auto = bfloat16 on GPUs, float32 on CPU

    def __post_init__(self) -> None:
        for name in ("gen_len", "block_size", "batch_size", "chunk_size", "max_shard_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"hidden_dtype must be one of {HIDDEN_DTYPES}")

    @property
    def columns(self) -> PromptColumns:
        return PromptColumns(self.prompt_field, self.answer_field, self.messages_field,
                             self.system_field, self.split)


@dataclass
class PromptSet:
    rows: list[dict]
    prompt_ids: list[list[int]]
    skipped_long: int       # rows dropped by the max_prompt_tokens filter


def prepare_prompts(sources: list, tokenizer: Tokenizer, cfg: CollectConfig) -> PromptSet:
    """Load, template and filter the prompts (deterministic: every rank computes the same)."""
    rows = load_prompt_rows(sources, cfg.columns)
    kept, ids, skipped = [], [], 0
    for r in rows:
        p = chat_prompt_ids(tokenizer, prompt_messages(r))
        if cfg.max_prompt_tokens and len(p) > cfg.max_prompt_tokens:
            skipped += 1
            continue
        kept.append(r)
        ids.append(p)
        if cfg.limit and len(kept) >= cfg.limit:
            break
    return PromptSet(kept, ids, skipped)


def record_bytes(cfg: CollectConfig, hidden_size: int, prompt_len: int) -> int:
    """Upper bound of one trajectory's bytes in a shard (hidden states dominate)."""
    hidden = cfg.gen_len * hidden_size * torch.empty(0, dtype=getattr(torch, cfg.hidden_dtype)
                                                      ).element_size()
    ints = 4 * (prompt_len + 3 * cfg.gen_len) + 4 * 5 * 2   # int32 fields + offsets
    return hidden + ints


def effective_chunk_size(cfg: CollectConfig, hidden_size: int, max_prompt_len: int) -> int:
    budget = int(cfg.max_shard_mb * 2**20) - 8 * 5     # each field's offsets end with one more
    return max(1, min(cfg.chunk_size, budget // record_bytes(cfg, hidden_size, max_prompt_len)))


def collect(model_dir: Path, prompt_sources: list, out_dir: Path, cfg: CollectConfig) -> dict:
    """Collect this rank's missing shards, then refresh the index. Returns the index."""
    info = dist_info()
    model_path = resolve_model_path(model_dir)
    tokenizer = Tokenizer.from_pretrained(model_path)
    prompts = prepare_prompts(prompt_sources, tokenizer, cfg)
    if not prompts.rows:
        raise ValueError("no prompts left to collect (check --max-prompt-tokens and the sources)")
    hidden_size = load_config(model_path).hidden_size
    chunk = effective_chunk_size(cfg, hidden_size, max(len(p) for p in prompts.prompt_ids))
    num_chunks = -(-len(prompts.rows) // chunk)
    extra = {"model": str(model_dir), "gen_len": cfg.gen_len, "block_size": cfg.block_size,
             "policy": "bidirectional, block-wise, 1 token/step, greedy",
             "hidden_dtype": cfg.hidden_dtype, "max_prompt_tokens": cfg.max_prompt_tokens,
             "skipped_long_prompts": prompts.skipped_long}
    _check_resumable(out_dir, {"num_prompts": len(prompts.rows), "chunk_size": chunk, **extra})
    owned = [c for c in range(num_chunks) if c % info.world_size == info.rank]
    if out_dir.exists():
        # Only this rank writes its chunks' shards: it alone may clear their leftovers.
        remove_stale_temporaries(out_dir, [shard_name(c) for c in owned])
    mine = [c for c in owned if not (out_dir / shard_name(c)).exists()]
    if mine:
        out_dir.mkdir(parents=True, exist_ok=True)
        device = device_for(info, cfg.device or None)
        dtype = ("float32" if device == "cpu" else None) if cfg.dtype == "auto" else cfg.dtype
        model = load_model(model_path, dtype=dtype, device=device)
        hidden_dtype = getattr(torch, cfg.hidden_dtype)
        for c in tqdm(mine, desc=f"collect[rank {info.rank}]", disable=not info.is_main):
            lo, hi = c * chunk, (c + 1) * chunk
            records = collect_chunk(model, tokenizer, prompts.rows[lo:hi],
                                    prompts.prompt_ids[lo:hi], lo, cfg)
            save_shard(out_dir / shard_name(c), records, hidden_dtype)
    index = build_index(out_dir, num_chunks, chunk, len(prompts.rows), extra)
    if _current_index(out_dir) == index:
        return index                  # nothing to write (a finished run, maybe read-only)
    with _index_lock(out_dir):
        return write_index(out_dir, num_chunks, chunk, len(prompts.rows), extra)


def _check_resumable(out_dir: Path, settings: dict) -> None:
    if not (out_dir / INDEX).exists() or not any(out_dir.glob("shard-*.safetensors")):
        return
    index = read_index(out_dir)
    differ = {k: (index.get(k), settings[k]) for k in RESUME_KEYS if index.get(k) != settings[k]
              and not (k in ("hidden_dtype", "max_prompt_tokens") and k not in index)}
    if differ:
        detail = ", ".join(f"{k}: {old} on disk vs {new} now" for k, (old, new) in differ.items())
        raise ValueError(f"{out_dir} holds a collection made with other settings ({detail}); "
                         "rerun with the same settings to resume it, or use another --out")


def _current_index(out_dir: Path) -> dict | None:
    try:
        return read_index(out_dir)
    except (OSError, ValueError):
        return None


@contextmanager
def _index_lock(out_dir: Path) -> Iterator[None]:
    """Ranks finish in any order: each rewrites the index under an exclusive lock after its
    shards are on disk, so the last one to finish writes an index listing all of them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".index.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def collect_chunk(model, tokenizer: Tokenizer, rows: list[dict], prompt_ids: list[list[int]],
                  first_index: int, cfg: CollectConfig) -> list[Trajectory]:
    stop = {model.config.eos_token_id, tokenizer.eot_token_id} - {None}
    records: list[Trajectory] = []
    for lo in range(0, len(rows), cfg.batch_size):
        batch = rows[lo:lo + cfg.batch_size]
        prompts = prompt_ids[lo:lo + cfg.batch_size]
        res = decode_bidirectional(model, prompts, cfg.gen_len, cfg.block_size, stop,
                                   tokens_per_step=1, record_hidden=True)
        for i, r in enumerate(batch):
            meta = {k: v for k, v in r.items() if k not in ("prompt",)}
            meta.update({"index": first_index + lo + i, "prompt": r["prompt"],
                         "num_steps": int(res.num_steps[i])})
            records.append(Trajectory(
                prompt_ids=torch.tensor(prompts[i]),
                tokens=res.tokens[i].cpu(), steps=res.steps[i].cpu(),
                hidden=res.hidden[i].cpu(),
                answer_ids=torch.tensor(answer_ids(tokenizer, r["answer"], cfg.gen_len,
                                                   model.config.eos_token_id, truncate=True)),
                meta=meta))
    return records
