"""The small world's tokenizer: word-level, built with `tokenizers`, saved in the standard files.

Word-level because the world's alphabet is a few hundred words: every number and name is one
token, so the model spends its capacity on the arithmetic dependencies, not on spelling.
Special tokens mirror LLaDA-8B-Instruct's names, so the chat template is LLaDA's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from cdlm.training.world.tasks import vocabulary

PAD = "<|pad|>"
UNK = "<|unk|>"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOT = "<|eot_id|>"
MASK = "<|mdm_mask|>"
HEADER_START = "<|start_header_id|>"
HEADER_END = "<|end_header_id|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, EOT, MASK, HEADER_START, HEADER_END)
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# LLaDA-8B-Instruct's chat template (LLaMA-3 style headers), verbatim.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def build_tokenizer() -> Tokenizer:
    """Special tokens get the first ids (stable across vocabulary changes), then words sorted."""
    words = [w for w in sorted(set(vocabulary()) | set(ROLES)) if w not in SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: `tokenizers` joins word-level tokens with single spaces, which is the
    # world's spacing exactly (every word is space-separated).
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(out_dir: str | Path) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json; return special ids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                        "rstrip": False, "single_word": False, "special": True}
             for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
        "mask_token": MASK,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [EOT, HEADER_START, HEADER_END],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
                   "mask_token": MASK, "additional_special_tokens": [EOT, HEADER_START, HEADER_END]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return special_ids(tok)


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {"pad": tok.token_to_id(PAD), "bos": tok.token_to_id(BOS), "eos": tok.token_to_id(EOS),
            "eot": tok.token_to_id(EOT), "mask": tok.token_to_id(MASK),
            "vocab_size": tok.get_vocab_size()}
