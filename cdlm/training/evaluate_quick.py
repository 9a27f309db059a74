"""A fast accuracy probe used while training and for world-design experiments (the real table
is `training.evaluate`): batched greedy block-wise decoding of a bidirectional model."""

from __future__ import annotations

from pathlib import Path

import torch

from cdlm.models.transformer import DiffusionLM
from cdlm.tokenizer import Tokenizer
from cdlm.training.data import chat_prompt_ids
from cdlm.training.decode import decode_bidirectional
from cdlm.training.io_utils import read_jsonl
from cdlm.training.world.tasks import final_answer


def naive_accuracy(model: DiffusionLM, tokenizer: Tokenizer, rows: list[dict], gen_len: int,
                   block_size: int, tokens_per_step: int = 1, threshold: float = 1.0) -> dict:
    """Accuracy, mean steps and tokens per step of block-wise decoding: k tokens per step, or
    the threshold rule when tokens_per_step is 0 (greedy)."""
    prompts = [chat_prompt_ids(tokenizer, r["prompt"]) for r in rows]
    stop = {model.config.eos_token_id, tokenizer.eot_token_id} - {None}
    res = decode_bidirectional(model, prompts, gen_len, block_size, stop, tokens_per_step,
                               threshold)
    correct, decided = 0, 0
    for r, toks in zip(rows, res.tokens.tolist()):
        kept = [t for t in toks if t != model.config.mask_token_id]
        decided += len(kept)
        correct += final_answer(tokenizer.decode(kept)) == r["result"]
    steps = float(res.num_steps.float().sum())
    return {"acc": correct / max(1, len(rows)), "steps": steps / max(1, len(rows)),
            "tokens_per_step": decided / max(1.0, steps)}


def probe(test_files: dict[str, Path], tokenizer: Tokenizer, n: int, gen_len: int,
          block_size: int, ks: tuple[int, ...] = (1,), thresholds: tuple[float, ...] = ()):
    """A closure for train_teacher's eval hook: per family, accuracy on n prompts at each k
    tokens per step and each threshold."""
    sets = {fam: read_jsonl(path)[:n] for fam, path in test_files.items()}

    def run(model: DiffusionLM) -> dict:
        out = {}
        with torch.no_grad():
            for fam, rows in sets.items():
                for k in ks:
                    out[f"{fam}@k{k}"] = naive_accuracy(model, tokenizer, rows, gen_len,
                                                        block_size, k)
                for t in thresholds:
                    out[f"{fam}@t{t}"] = naive_accuracy(model, tokenizer, rows, gen_len,
                                                        block_size, 0, t)
        return out
    return run
