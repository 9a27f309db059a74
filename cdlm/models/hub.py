"""Where a checkpoint lives: a local directory, or a Hugging Face hub id fetched once."""

from __future__ import annotations

import os
from pathlib import Path

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def resolve_model_path(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as it is, otherwise a hub id fetched (or found in the hub cache)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    name = str(name_or_path)
    if local.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"model {name!r} is neither a directory nor a hub id (org/name)")
    from huggingface_hub import snapshot_download
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS,
                                  local_files_only=offline))
