"""Prompt sets for `collect`: JSONL files, parquet files, `datasets` directories, hub datasets.

Every source becomes a list of rows, each either
  {"prompt": str, "answer": str, ...}             a prompt/answer pair, or
  {"messages": [...], "prompt": str, "answer": str, ...}   a conversation cut before its last
                                                           assistant turn (the answer)
plus the source's other scalar columns (carried into the trajectory metadata). Column names
are mapped by `PromptColumns`: a prompt/answer pair under other names (`--prompt-field
question --answer-field solution`), or a conversations column (`--messages-field
conversations`, optionally `--system-field system`) in either common shape: OpenAI's
{"role", "content"} or ShareGPT's {"from": "human"|"gpt"|"user"|"assistant", "value"}, as in
Bespoke-Stratos-17k.

Sources, by what the argument is:
  *.jsonl / *.json file          JSON lines (read here: no `datasets` needed)
  *.parquet file                 read with pyarrow
  directory from save_to_disk    datasets.load_from_disk (a DatasetDict: `split`)
  other directory                datasets.load_dataset(dir, split=split): parquet/json/csv
                                 files in the hub's layout (a downloaded dataset repo)
  org/name (no such path)        datasets.load_dataset(hub id, split=split) (HF_HUB_OFFLINE
                                 and the datasets cache are honoured)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cdlm.training.io_utils import iter_jsonl

ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class PromptColumns:
    prompt: str = "prompt"
    answer: str = "answer"
    messages: str = ""     # a conversations column; when set, prompt/answer come from it
    system: str = ""       # optional column with a system prompt for conversations
    split: str = "train"   # split of a dataset directory or hub dataset


def load_prompt_rows(sources: list[str | Path], columns: PromptColumns = PromptColumns(),
                     limit: int = 0) -> list[dict]:
    """All rows of all sources, in order (chunking relies on a stable order)."""
    rows: list[dict] = []
    for source in sources:
        for i, raw in enumerate(iter_source(source, columns.split)):
            try:
                rows.append(normalise_row(raw, columns))
            except ValueError as exc:
                raise ValueError(f"{source}: row {i}: {exc}") from None
            if limit and len(rows) >= limit:
                return rows
    return rows


def iter_source(source: str | Path, split: str = "train") -> Iterator[dict]:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".parquet":
            yield from _parquet_rows(path)
        elif path.suffix in (".jsonl", ".json"):
            yield from iter_jsonl(path)
        else:
            raise ValueError(f"{path}: unknown prompt file type {path.suffix!r} "
                             "(expected .jsonl, .json or .parquet)")
        return
    import datasets   # only for dataset directories and hub ids

    if path.is_dir():
        if any((path / m).exists() for m in SAVE_TO_DISK_MARKERS):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(f"{path}: no split {split!r} (has {sorted(data)})")
                data = data[split]
        else:
            data = datasets.load_dataset(str(path), split=split)
    elif (str(source).count("/") == 1 and not str(source).startswith((".", "/", "~"))
          and path.suffix not in (".jsonl", ".json", ".parquet")):
        data = datasets.load_dataset(str(source), split=split)
    else:
        raise FileNotFoundError(f"prompt source {str(source)!r} is neither a file, a directory "
                                "nor a hub dataset id (org/name)")
    yield from data


def _parquet_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(str(path))
    for batch in parquet.iter_batches(batch_size=1024):
        yield from batch.to_pylist()


def normalise_row(raw: dict[str, Any], columns: PromptColumns) -> dict:
    if columns.messages:
        return _conversation_row(raw, columns)
    for name in (columns.prompt, columns.answer):
        if name not in raw:
            raise ValueError(f"no {name!r} column (columns: {sorted(raw)}); map yours with "
                             "--prompt-field / --answer-field, or --messages-field")
    if (columns.prompt, columns.answer) == ("prompt", "answer"):
        return dict(raw)   # the native shape, kept as it is (metadata included)
    extra = {k: v for k, v in raw.items() if k not in (columns.prompt, columns.answer)
             and _is_scalar(v)}
    return {**extra, "prompt": str(raw[columns.prompt]), "answer": str(raw[columns.answer])}


def _conversation_row(raw: dict[str, Any], columns: PromptColumns) -> dict:
    turns = raw.get(columns.messages)
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"column {columns.messages!r} is not a non-empty list of turns")
    messages = [_turn(t) for t in turns]
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                         default=None)
    if last_assistant is None:
        raise ValueError("the conversation has no assistant turn (the reference answer)")
    prompt = messages[:last_assistant]
    if not any(m["role"] == "user" for m in prompt):
        raise ValueError("no user turn before the last assistant turn")
    system = raw.get(columns.system) if columns.system else None
    if system and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": str(system)}] + prompt
    extra = {k: v for k, v in raw.items() if k not in (columns.messages, columns.system)
             and _is_scalar(v)}
    user_text = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    return {**extra, "messages": prompt, "prompt": user_text,
            "answer": messages[last_assistant]["content"]}


def _turn(turn: Any) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise ValueError(f"a turn is {type(turn).__name__}, expected an object")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if not isinstance(role, str) or not isinstance(content, str):
        raise ValueError("a turn needs role/content (or from/value) strings")
    role = ROLE_ALIASES.get(role.lower(), role.lower())
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"unknown role {role!r}")
    return {"role": role, "content": content}


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def prompt_messages(row: dict) -> str | list[dict[str, str]]:
    """What the chat template is applied to: the conversation, or the single user prompt."""
    return row["messages"] if "messages" in row else row["prompt"]
