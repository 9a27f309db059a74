"""Tokenizer: the checkpoint's own files, read with the `tokenizers` library.

Reads `tokenizer.json` when present (LLaDA), else builds the byte-level BPE from
`vocab.json` + `merges.txt` (Dream ships a Qwen2-style tokenizer under a custom class name, so
we do not depend on its remote code). The chat template comes from `tokenizer_config.json`
(or `chat_template.jinja`) and is rendered with jinja2 like transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

# Tokens that end a chat turn in the supported families.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")


class ChatTemplateError(ValueError):
    pass


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, config: dict[str, Any],
                 chat_template: str | None) -> None:
        self.backend = backend
        self.config = config
        self.chat_template = chat_template
        self.eot_token_id = next((i for t in END_OF_TURN_TOKENS
                                  if (i := backend.token_to_id(t)) is not None), None)
        self._compiled_template = None

    # --- loading ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        if (path / "tokenizer.json").exists():
            backend = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
            backend = _byte_level_bpe(path, config)
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.json + merges.txt")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        return cls(backend, config, template)

    # --- ids --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _special(self, name: str) -> str | None:
        value = self.config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return value

    @property
    def bos_token(self) -> str | None:
        return self._special("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special("eos_token")

    # --- text -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """Render messages to the prompt text (special tokens included, as text)."""
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except ChatTemplateError:
            raise
        except Exception as exc:  # a template error is the request's fault, not the server's
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # The template already carries the BOS and special tokens as text.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _compile_template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _byte_level_bpe(path: Path, config: dict[str, Any]) -> _HFTokenizer:
    """Qwen2's tokenizer rebuilt from vocab.json + merges.txt (what Qwen2TokenizerFast does)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"))
    tok = _HFTokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    added = config.get("added_tokens_decoder") or {}
    for _, spec in sorted(added.items(), key=lambda kv: int(kv[0])):
        token = AddedToken(spec["content"], special=bool(spec.get("special", True)),
                           normalized=bool(spec.get("normalized", False)))
        if spec.get("special", True):
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    for index, spec in added.items():
        if tok.token_to_id(spec["content"]) != int(index):
            raise ValueError(f"{path}: added token {spec['content']!r} declared as id {index} "
                             f"but lands at {tok.token_to_id(spec['content'])}")
    return tok
