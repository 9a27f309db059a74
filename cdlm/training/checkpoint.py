"""Resumable training state: one file, written atomically, holding everything a run needs."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import torch

from cdlm.training.io_utils import atomic_write_bytes


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise in memory, then write a temporary file, fsync, rename: a crash leaves the
    previous state intact, and a full disk surfaces as the OS's error (torch.save writing to
    a file reports it as an unrelated "unexpected pos" failure)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def load_state(path: str | Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
