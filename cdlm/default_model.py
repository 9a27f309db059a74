"""The bundled default model: what `LLM()` and `cdlm serve` use when no model is given.

Preference order: the trained small-world student shipped in `cdlm/assets/default/` (a LLaDA-
layout teacher plus the CDLM LoRA student), else a tiny LLaDA-layout model that the package
builds itself (random weights, byte-level tokenizer) so that the engine always has something
real to run. The built one is written once to the user cache and reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets" / "default"
_BUILT_VERSION = "random-llada-v1"

SPECIAL_TOKENS = ["<|endoftext|>", "<|mdm_mask|>", "<|startoftext|>", "<|eot_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]
# LLaMA-3 headers, as LLaDA-8B-Instruct's template uses.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def default_model() -> tuple[str, str | None]:
    """(base model directory, LoRA adapter directory or None)."""
    teacher, student = ASSETS / "teacher", ASSETS / "student"
    if (teacher / "config.json").exists():
        return str(teacher), str(student) if (student / "adapter_config.json").exists() else None
    return str(build_random_default()), None


def _cache_dir() -> Path:
    root = os.environ.get("CDLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cdlm")
    return Path(root) / _BUILT_VERSION


def write_byte_tokenizer(out: Path, chat_template: str = LLAMA3_CHAT_TEMPLATE) -> int:
    """A byte-level tokenizer (256 byte tokens + specials) in the standard files. Returns vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
        "mask_token": "<|mdm_mask|>", "chat_template": chat_template,
        "model_max_length": 4096}, indent=2))
    return tok.get_vocab_size(with_added_tokens=True)


def build_random_default(out: Path | None = None) -> Path:
    """Build (once) the tiny random LLaDA-layout fallback model and return its directory."""
    from cdlm.config import ModelConfig
    from cdlm.models.loader import save_pretrained
    from cdlm.models.transformer import DiffusionLM

    out = out or _cache_dir()
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    staging = out.with_name(out.name + f".build{os.getpid()}")
    vocab_size = write_byte_tokenizer(staging)
    tok = json.loads((staging / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    config = ModelConfig(
        family="llada", vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=4, intermediate_size=128, rope_theta=10000.0, norm_eps=1e-5,
        qkv_bias=False, mask_token_id=ids["<|mdm_mask|>"], eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|pad|>"], max_position_embeddings=4096, block_size=32)
    torch.manual_seed(0)
    save_pretrained(DiffusionLM(config), staging)
    if out.exists():
        return out  # another process finished first
    os.replace(staging, out)
    return out
