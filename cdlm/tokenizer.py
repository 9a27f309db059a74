"""Tokenizer: the checkpoint's own files, read with the `tokenizers` library.

Reads `tokenizer.json` when present (LLaDA), else builds the byte-level BPE from
`vocab.json` + `merges.txt` (Dream ships a Qwen2-style tokenizer under a custom class name, so
we do not depend on its remote code). The chat template comes from `tokenizer_config.json`
(or `chat_template.jinja`) and is rendered with jinja2 like transformers does.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from cdlm.errors import InvalidRequestError

# Tokens that end a chat turn in the supported families.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")


class ChatTemplateError(InvalidRequestError):
    def __init__(self, message: str) -> None:
        super().__init__(message, param="messages")


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

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items()
                         if t.special)

    @functools.cached_property
    def special_token_strings(self) -> tuple[str, ...]:
        return tuple(t.content for t in self.backend.get_added_tokens_decoder().values()
                     if t.special)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters in the longest vocabulary entry: no token covers more text (byte-level
        vocabularies spell one character per byte, so this bounds decoded characters too)."""
        return max((len(t) for t in self.backend.get_vocab(with_added_tokens=True)), default=1)

    @functools.cached_property
    def _adds_bos(self) -> bool:
        bos = self.bos_token_id
        return bos is not None and self.backend.encode("", add_special_tokens=True).ids[:1] == [bos]

    @functools.cached_property
    def _plain_backend(self) -> _HFTokenizer:
        """A copy that reads special-token strings as ordinary text."""
        plain = _HFTokenizer.from_str(self.backend.to_str())
        plain.encode_special_tokens = True
        return plain

    # --- text -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return _encode(self.backend, text, add_special_tokens)

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt's ids, with the start token the model was trained with, added
        as a Hugging Face fast tokenizer adds it for `add_special_tokens=True` (the
        tokenizer.json post-processor: LLaDA's puts `<|startoftext|>` first, Qwen2/Dream's adds
        nothing). One exception: a text that already begins with the BOS token (a
        chat-templated prompt sent to /v1/completions) does not get a second one."""
        ids = self.encode(text, add_special_tokens=True)
        bos = self.bos_token_id
        if (self._adds_bos and ids[:2] == [bos, bos] and self.bos_token
                and text.startswith(self.bos_token)):
            ids = ids[1:]
        return ids

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` with special-token strings read as text: never a control token (a
        vocabulary that holds such a string as a plain word gives the unknown token)."""
        ids = _encode(self._plain_backend, text, add_special_tokens=False)
        specials = self.special_token_ids
        if not specials.intersection(ids):
            return ids
        unk = self._special("unk_token")
        unk_id = None if unk is None else self.backend.token_to_id(unk)
        if unk_id is None:
            raise InvalidRequestError("the text contains a special-token string that this "
                                      "tokenizer can only read as that special token")
        return [unk_id if i in specials else i for i in ids]

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

    def encode_chat(self, messages: list[dict[str, Any]],
                    special_tokens_in_content: bool = False) -> list[int]:
        """The chat template applied, as ids. The template carries the BOS and the turn
        markers as text; by default special-token strings inside message content stay text
        (a user cannot close a turn or forge a header by typing `<|eot_id|>`). With
        `special_tokens_in_content` they become the special tokens, as a plain
        `encode(apply_chat_template(...))` does."""
        text = self.apply_chat_template(messages)
        specials = self.special_token_strings
        if special_tokens_in_content or not any(
                sp in str(m.get("content") or "") for m in messages for sp in specials):
            return self.encode(text, add_special_tokens=False)
        ids: list[int] = []
        for piece, is_content in self._chat_segments(messages, text):
            ids += self.encode_text(piece) if is_content else self.encode(
                piece, add_special_tokens=False)
        return ids

    def _chat_segments(self, messages: list[dict[str, Any]], text: str
                       ) -> list[tuple[str, bool]]:
        """Split the rendered chat into template text and message content, found by rendering
        once more with a placeholder for each content (the template's own text is what
        surrounds the placeholders)."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        skeleton = self.apply_chat_template(
            [{**m, "content": mark} for m, mark in zip(messages, marks)])
        template_parts = _split_on(skeleton, marks)
        if template_parts is None:
            raise ChatTemplateError("the chat template does not place message content verbatim,"
                                    " so special-token text in it cannot be kept as text")
        contents = [str(m.get("content") or "") for m in messages]
        for shape in (lambda c: c, str.strip):
            pieces = [shape(c) for c in contents]
            rebuilt = template_parts[0] + "".join(p + t for p, t in zip(pieces, template_parts[1:]))
            if rebuilt == text:
                out = [(template_parts[0], False)]
                for piece, tail in zip(pieces, template_parts[1:]):
                    out += [(piece, True), (tail, False)]
                return [(p, c) for p, c in out if p]
        raise ChatTemplateError("the chat template rewrites message content, so special-token "
                                "text in it cannot be kept as text")


# Texts longer than this go through `encode_batch`, which releases the interpreter lock while
# it works (plain `encode` holds it: a 2 MB prompt would stall every other thread for seconds).
_LONG_TEXT_CHARS = 4096


def _encode(backend: _HFTokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) > _LONG_TEXT_CHARS:
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    return backend.encode(text, add_special_tokens=add_special_tokens).ids


def _split_on(text: str, marks: list[str]) -> list[str] | None:
    """`text` cut at each mark in order (len(marks) + 1 parts), or None if one is missing."""
    parts, rest = [], text
    for mark in marks:
        head, found, rest = rest.partition(mark)
        if not found:
            return None
        parts.append(head)
    return parts + [rest]


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
