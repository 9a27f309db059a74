"""Prompt sets and their tokenisation (chat template applied), shared by every stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdlm.tokenizer import Tokenizer


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]   # chat-templated prompt, ending with the assistant header
    answer_ids: list[int]   # reference answer + end-of-turn + end-of-text padding to gen_len


def chat_prompt_ids(tokenizer: Tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """The prompt as the engine sees a chat request (template applied when the model has one).
    `prompt`: the user message, or a whole conversation (system / user / assistant turns)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if tokenizer.chat_template:
        return tokenizer.encode_chat(messages)
    if not isinstance(prompt, str):
        raise ValueError("a conversation needs the model's chat template; this tokenizer has none")
    return tokenizer.encode(prompt)


def answer_ids(tokenizer: Tokenizer, answer: str, gen_len: int, eos_id: int,
               truncate: bool = False) -> list[int]:
    """LLaDA's SFT target: the answer, the end-of-turn token, then end-of-text up to gen_len,
    so the model learns to fill the unused tail of its generation window with EOS.
    A longer answer is an error, or with `truncate` its first gen_len tokens (real reasoning
    sets hold answers of thousands of tokens; the DLM loss sees the generation window)."""
    ids = tokenizer.encode(answer, add_special_tokens=False)
    if tokenizer.eot_token_id is not None:
        ids = ids + [tokenizer.eot_token_id]
    if len(ids) > gen_len:
        if not truncate:
            raise ValueError(f"answer of {len(ids)} tokens does not fit gen_len={gen_len}")
        return ids[:gen_len]
    return ids + [eos_id] * (gen_len - len(ids))


def encode_example(tokenizer: Tokenizer, row: dict, gen_len: int, eos_id: int) -> Example:
    return Example(chat_prompt_ids(tokenizer, row["prompt"]),
                   answer_ids(tokenizer, row["answer"], gen_len, eos_id))


@dataclass
class SFTBatch:
    input_ids: torch.Tensor    # [batch, seq] prompt + answer, right-padded
    answer_mask: torch.Tensor  # [batch, seq] bool: positions of the answer (never the prompt)
    valid: torch.Tensor        # [batch, seq] bool: real tokens (False on right padding)
    prompt_lens: torch.Tensor  # [batch]


def collate_sft(examples: list[Example], pad_id: int) -> SFTBatch:
    width = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    answer = torch.zeros((len(examples), width), dtype=torch.bool)
    valid = torch.zeros((len(examples), width), dtype=torch.bool)
    for r, e in enumerate(examples):
        p, a = len(e.prompt_ids), len(e.answer_ids)
        ids[r, :p + a] = torch.tensor(e.prompt_ids + e.answer_ids)
        answer[r, p:p + a] = True
        valid[r, :p + a] = True
    prompt_lens = torch.tensor([len(e.prompt_ids) for e in examples])
    return SFTBatch(ids, answer, valid, prompt_lens)
