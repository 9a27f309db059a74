"""The bundled default model: what `LLM()` and `cdlm serve` use when no model is given.

It is the trained small-world student shipped in `cdlm/assets/default/`: a LLaDA-layout teacher
plus the CDLM LoRA student, rebuilt by `python -m cdlm.training world` + `export-default`. The byte-level
tokenizer below is what tests and benchmarks use for their own tiny checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).parent / "assets" / "default"

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
    if not (teacher / "config.json").exists():
        raise FileNotFoundError(
            f"the bundled default model is missing from {ASSETS} (an install without package "
            "data?): pass a model directory or hub id, or rebuild it with `python -m cdlm.training "
            "world` and `python -m cdlm.training export-default`")
    return str(teacher), str(student) if (student / "adapter_config.json").exists() else None


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
