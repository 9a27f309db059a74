"""Stage `collect`: naive-policy teacher trajectories over a prompt set (SPEC section 3).

The teacher decodes bidirectionally, block by block, exactly one token per step (the most
confident masked position of the current block), greedy. For every prompt we store the token
and finalisation step of each generated position, the teacher's last hidden state at each
position's finalisation (logits are `lm_head(hidden)`, far smaller than logits), and the
reference answer.

Work is cut into fixed chunks of prompts; chunk c is shard c. Rank r of a W-process launch
(`torchrun` or `accelerate launch`) takes the chunks with c % W == r, so no communication is
needed and a rerun (any W) skips the shards already on disk: that is the resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cdlm.models.loader import load_model
from cdlm.tokenizer import Tokenizer
from training.data import answer_ids, chat_prompt_ids
from training.decode import decode_bidirectional
from training.dist import device_for, dist_info
from training.io_utils import read_jsonl
from training.trajectories import Trajectory, save_shard, shard_name, write_index


@dataclass
class CollectConfig:
    gen_len: int = 64
    block_size: int = 32
    batch_size: int = 32
    chunk_size: int = 256
    hidden_dtype: str = "float16"
    limit: int = 0          # 0 = every prompt
    device: str = ""        # "" = cuda:LOCAL_RANK when available, else cpu


def load_prompts(files: list[Path], limit: int = 0) -> list[dict]:
    """Rows with at least `prompt` and `answer`; order is the files' order (chunking is stable)."""
    rows = [r for f in files for r in read_jsonl(f)]
    for i, r in enumerate(rows):
        if "prompt" not in r or "answer" not in r:
            raise ValueError(f"prompt row {i} lacks 'prompt' or 'answer'")
    return rows[:limit] if limit else rows


def collect(model_dir: Path, prompt_files: list[Path], out_dir: Path, cfg: CollectConfig) -> dict:
    """Collect this rank's missing shards, then refresh the index. Returns the index."""
    info = dist_info()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = load_prompts(prompt_files, cfg.limit)
    num_chunks = -(-len(rows) // cfg.chunk_size)
    mine = [c for c in range(num_chunks)
            if c % info.world_size == info.rank and not (out_dir / shard_name(c)).exists()]
    extra = {"model": str(model_dir), "gen_len": cfg.gen_len, "block_size": cfg.block_size,
             "policy": "bidirectional, block-wise, 1 token/step, greedy"}
    if mine:
        device = device_for(info, cfg.device or None)
        model = load_model(model_dir, dtype="float32" if device == "cpu" else None, device=device)
        tokenizer = Tokenizer.from_pretrained(model_dir)
        hidden_dtype = getattr(torch, cfg.hidden_dtype)
        for c in tqdm(mine, desc=f"collect[rank {info.rank}]", disable=not info.is_main):
            chunk = rows[c * cfg.chunk_size:(c + 1) * cfg.chunk_size]
            records = collect_chunk(model, tokenizer, chunk, c * cfg.chunk_size, cfg)
            save_shard(out_dir / shard_name(c), records, hidden_dtype)
    return write_index(out_dir, num_chunks, cfg.chunk_size, len(rows), extra)


def collect_chunk(model, tokenizer: Tokenizer, rows: list[dict], first_index: int,
                  cfg: CollectConfig) -> list[Trajectory]:
    stop = {model.config.eos_token_id, tokenizer.eot_token_id} - {None}
    records: list[Trajectory] = []
    for lo in range(0, len(rows), cfg.batch_size):
        batch = rows[lo:lo + cfg.batch_size]
        prompts = [chat_prompt_ids(tokenizer, r["prompt"]) for r in batch]
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
                                                   model.config.eos_token_id)),
                meta=meta))
    return records
