"""A fast accuracy probe used while training (the real table is `training.evaluate`)."""

from __future__ import annotations

from pathlib import Path

import torch

from cdlm.models.transformer import DiffusionLM
from cdlm.tokenizer import Tokenizer
from training.data import chat_prompt_ids
from training.decode import decode_bidirectional
from training.io_utils import read_jsonl
from training.world.tasks import final_answer


def naive_accuracy(model: DiffusionLM, tokenizer: Tokenizer, rows: list[dict], gen_len: int,
                   block_size: int, tokens_per_step: int = 1) -> dict:
    """Accuracy and mean steps of block-wise decoding with k tokens per step (greedy)."""
    prompts = [chat_prompt_ids(tokenizer, r["prompt"]) for r in rows]
    stop = {model.config.eos_token_id, tokenizer.eot_token_id} - {None}
    res = decode_bidirectional(model, prompts, gen_len, block_size, stop, tokens_per_step)
    correct = 0
    for r, toks in zip(rows, res.tokens.tolist()):
        text = tokenizer.decode([t for t in toks if t != model.config.mask_token_id])
        correct += final_answer(text) == r["result"]
    return {"acc": correct / max(1, len(rows)), "steps": float(res.num_steps.float().mean())}


def probe(test_files: dict[str, Path], tokenizer: Tokenizer, n: int, gen_len: int,
          block_size: int, ks: tuple[int, ...] = (1,)):
    """A closure for train_teacher's eval hook: per family and k, accuracy on n test prompts."""
    sets = {fam: read_jsonl(path)[:n] for fam, path in test_files.items()}

    def run(model: DiffusionLM) -> dict:
        with torch.no_grad():
            return {f"{fam}@k{k}": naive_accuracy(model, tokenizer, rows, gen_len, block_size, k)
                    for fam, rows in sets.items() for k in ks}
    return run
