"""Stage `world-data`: the tokenizer and the prompt JSONL files of every family and split."""

from __future__ import annotations

from pathlib import Path

from cdlm.training.io_utils import write_jsonl
from cdlm.training.world.tasks import FAMILIES, generate
from cdlm.training.world.tokenizer import save_tokenizer


def data_path(root: Path, family: str, split: str) -> Path:
    return root / "data" / f"{family}-{split}.jsonl"


def build_world_data(root: Path, train_per_family: int, test_per_family: int,
                     seed: int = 0, val_per_family: int | None = None) -> dict[str, Path]:
    """Write root/tokenizer/ and root/data/{family}-{split}.jsonl (train, val, test); skip what
    exists. The validation split has as many problems as test unless told otherwise."""
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        save_tokenizer(tok_dir)
    paths = {}
    for family in FAMILIES:
        val = test_per_family if val_per_family is None else val_per_family
        for split, count in (("train", train_per_family), ("val", val), ("test", test_per_family)):
            path = data_path(root, family, split)
            if not path.exists():
                rows = [p.to_json() for p in generate(family, split, count, seed)]
                write_jsonl(path, rows)
            paths[f"{family}-{split}"] = path
    return paths
