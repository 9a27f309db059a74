"""Trajectory storage: streaming safetensors shards plus a JSON index.

One record per prompt (SPEC section 3):
  prompt_ids   [P]       the templated prompt
  tokens       [G]       the teacher's final token at each generated position
  steps        [G]       the step (0-based, counted over the whole request) at which each position
                         was finalised; positions never decoded (past the early stop) hold -1
  hidden       [G, D]    the teacher's last hidden state (the lm_head input) at each position at
                         the moment it was finalised, so teacher logits = lm_head(hidden)
  answer_ids   [A]       the ground-truth answer, tokenised (for the DLM loss)
Records of a shard are concatenated along dim 0 with offsets, so a shard is four flat tensors
per field; a shard is written to a temporary name and renamed, so a shard file on disk is
always complete, and a killed collection resumes by skipping the shards that exist.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from cdlm.training.io_utils import reporting_disk_full, temp_path_next_to, write_json_if_changed

FIELDS: tuple[str, ...] = ("prompt_ids", "tokens", "steps", "hidden", "answer_ids")
INDEX = "index.json"


@dataclass
class Trajectory:
    prompt_ids: torch.Tensor   # [P] long
    tokens: torch.Tensor       # [G] long
    steps: torch.Tensor        # [G] long, -1 = never finalised
    hidden: torch.Tensor       # [G, D] in the storage dtype (float16 by default)
    answer_ids: torch.Tensor   # [A] long
    meta: dict                 # prompt index, family, reference answer text, ...

    @property
    def num_steps(self) -> int:
        return int(self.steps.max().item()) + 1 if self.steps.numel() else 0


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:05d}.safetensors"


def save_shard(path: Path, records: list[Trajectory], hidden_dtype: torch.dtype) -> None:
    """Concatenate the records' fields, store offsets, write atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for name in FIELDS:
        parts = [getattr(r, name) for r in records]
        lengths = torch.tensor([p.shape[0] for p in parts], dtype=torch.long)
        tensors[f"{name}.offsets"] = torch.cat([torch.zeros(1, dtype=torch.long),
                                                lengths.cumsum(0)])
        data = torch.cat(parts) if parts else torch.zeros(0)
        tensors[name] = (data.to(hidden_dtype) if name == "hidden" else data.to(torch.int32))
        tensors[name] = tensors[name].contiguous()
    metadata = {"meta": json.dumps([r.meta for r in records])}
    with reporting_disk_full(path):
        tmp = temp_path_next_to(path)
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def load_shard(path: Path) -> list[Trajectory]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metas = json.loads(f.metadata()["meta"])
    t = load_file(str(path))
    out = []
    for i, meta in enumerate(metas):
        fields = {}
        for name in FIELDS:
            lo, hi = t[f"{name}.offsets"][i].item(), t[f"{name}.offsets"][i + 1].item()
            x = t[name][lo:hi]
            # Hidden states stay in their storage dtype (float16): a pool of shards in memory
            # is then half the size; consumers convert the few rows they use.
            fields[name] = x if name == "hidden" else x.long()
        out.append(Trajectory(meta=meta, **fields))
    return out


def build_index(root: Path, num_chunks: int, chunk_size: int, num_prompts: int,
                extra: dict) -> dict:
    """List the shards present; `complete` says whether every chunk has been collected."""
    present = sorted(p.name for p in root.glob("shard-*.safetensors"))
    return {"num_prompts": num_prompts, "chunk_size": chunk_size, "num_chunks": num_chunks,
            "shards": present, "complete": len(present) == num_chunks, **extra}


def write_index(root: Path, num_chunks: int, chunk_size: int, num_prompts: int,
                extra: dict) -> dict:
    index = build_index(root, num_chunks, chunk_size, num_prompts, extra)
    write_json_if_changed(root / INDEX, index)
    return index


def read_index(root: str | Path) -> dict:
    return json.loads((Path(root) / INDEX).read_text())


def iter_trajectories(root: str | Path) -> Iterator[Trajectory]:
    """Stream records shard by shard (a 7B-scale collection never has to fit in memory)."""
    root = Path(root)
    for name in read_index(root)["shards"]:
        yield from load_shard(root / name)


class TrajectoryPool:
    """Random trajectories from a collection that need not fit in memory.

    At most `max_shards` shards are held at once; every `refresh_every` draws one of them is
    swapped for another, so over a run every shard is visited. When every shard fits, draws
    are uniform over all records. Memory is that of `max_shards` shards, whatever the number
    of shards in the collection (the index's list of names aside).

    `state` (from `state_dict()`) restores a pool exactly: which shards are held, its own
    generator and its draw count, so a resumed run draws what the uninterrupted one would.
    """

    def __init__(self, root: str | Path, max_shards: int = 8, refresh_every: int = 1024,
                 rng: random.Random | None = None, state: dict | None = None) -> None:
        self.root = Path(root)
        self.names = list(read_index(self.root)["shards"])
        if not self.names:
            raise ValueError(f"{self.root}: no shards")
        self.max_shards = max(1, max_shards)
        self.refresh_every = refresh_every
        self.rng = rng or random.Random(0)
        self.draws = 0
        if state is None:
            held = self.rng.sample(self.names, min(self.max_shards, len(self.names)))
        else:
            held = list(state["loaded"])
            missing = [n for n in held if n not in self.names]
            if missing:
                raise ValueError(f"{self.root}: the checkpoint's pool holds shards this "
                                 f"collection lacks ({missing[:3]}); resume with the "
                                 "trajectories the run started on")
            self.rng.setstate(state["rng"])
            self.draws = int(state["draws"])
        self.loaded: dict[str, list[Trajectory]] = {n: load_shard(self.root / n) for n in held}
        self._flat = [t for n in sorted(self.loaded) for t in self.loaded[n]]

    @property
    def all_loaded(self) -> bool:
        return len(self.loaded) == len(self.names)

    def draw(self, rng: random.Random) -> Trajectory:
        if not self.all_loaded:
            self.draws += 1
            if self.draws % self.refresh_every == 0:
                self._swap()
        return self._flat[rng.randrange(len(self._flat))]

    def state_dict(self) -> dict:
        return {"loaded": sorted(self.loaded), "draws": self.draws, "rng": self.rng.getstate()}

    def resident_bytes(self) -> int:
        """Bytes of tensor data the pool holds (what stays flat in the number of shards)."""
        total = 0
        for shard in self.loaded.values():
            if shard:   # a shard's hidden states are views of one storage
                total += shard[0].hidden.untyped_storage().nbytes()
            total += sum(getattr(t, f).nbytes for t in shard for f in FIELDS if f != "hidden")
        return total

    def _swap(self) -> None:
        out = self.rng.choice(sorted(self.loaded))
        new = self.rng.choice([n for n in self.names if n not in self.loaded])
        del self.loaded[out]
        self._flat = []               # drop the last references first: never max_shards + 1
        self.loaded[new] = load_shard(self.root / new)
        self._flat = [t for n in sorted(self.loaded) for t in self.loaded[n]]
