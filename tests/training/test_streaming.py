"""Streaming holds at scale: the trajectory pool's memory stays flat in the number of shards
(measured: resident tensor bytes and the peak RSS of a real process), and collect bounds the
size of each shard."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import ROOT, env
from cdlm.training.collect import CollectConfig, collect
from cdlm.training.distill import DistillConfig, distill
from cdlm.training.trajectories import (Trajectory, TrajectoryPool, load_shard, save_shard,
                                   shard_name, write_index)
from cdlm.training.world.pipeline import collect_prompts

GEN, BLOCK = 64, 32


def synthetic_collection(root: Path, shards: int, per_shard: int, vocab: int, hidden: int,
                         seed: int = 0) -> Path:
    """Valid naive-policy trajectories (one position finalised per step, block by block) with
    random tokens (no special ids) and hidden states."""
    rng = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True)
    for c in range(shards):
        records = []
        for i in range(per_shard):
            order = torch.cat([torch.randperm(BLOCK, generator=rng) + b * BLOCK
                               for b in range(GEN // BLOCK)])
            steps = torch.empty(GEN, dtype=torch.long)
            steps[order] = torch.arange(GEN)
            records.append(Trajectory(
                prompt_ids=torch.randint(8, vocab, (12,), generator=rng),
                tokens=torch.randint(8, vocab, (GEN,), generator=rng), steps=steps,
                hidden=torch.randn(GEN, hidden, generator=rng),
                answer_ids=torch.randint(8, vocab, (GEN,), generator=rng),
                meta={"index": c * per_shard + i}))
        save_shard(root / shard_name(c), records, torch.float16)
    write_index(root, shards, per_shard, shards * per_shard,
                {"gen_len": GEN, "block_size": BLOCK, "model": "synthetic"})
    return root


@pytest.fixture(scope="module")
def collections(micro_world, tmp_path_factory) -> dict[int, Path]:
    """10 and 400 shards of 48 trajectories in the shapes of the micro world's teacher."""
    from cdlm.models.loader import load_config
    teacher = load_config(micro_world[0] / "teacher" / "model")
    root = tmp_path_factory.mktemp("many")
    return {n: synthetic_collection(root / f"c{n}", n, 48, teacher.vocab_size,
                                    teacher.hidden_size) for n in (10, 400)}


def test_pool_holds_at_most_max_shards_whatever_the_collection_size(collections):
    shard_bytes = (collections[10] / shard_name(0)).stat().st_size
    peaks = {}
    for n, root in collections.items():
        pool = TrajectoryPool(root, max_shards=3, refresh_every=5, rng=random.Random(0))
        rng, seen, peak = random.Random(1), set(), 0
        for _ in range(2000):                       # 400 swaps
            seen.add(pool.draw(rng).meta["index"])
            peak = max(peak, pool.resident_bytes())
            assert len(pool.loaded) == 3
        peaks[n] = peak
        assert len(seen) > 3 * 48                   # it did move through the collection
    assert peaks[400] <= 3 * 2 * shard_bytes and peaks[10] <= 3 * 2 * shard_bytes
    assert abs(peaks[400] - peaks[10]) < shard_bytes


POOL_RSS = """
import random, resource, sys
from cdlm.training.trajectories import TrajectoryPool
pool = TrajectoryPool(sys.argv[1], max_shards=3, refresh_every=5, rng=random.Random(0))
rng = random.Random(1)
for _ in range(4000):
    pool.draw(rng)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_peak_memory_of_a_streaming_process_is_flat_in_the_number_of_shards(collections):
    """A real process draws 4000 trajectories (800 shard swaps) from 10 and from 400 shards
    of the same size: its peak RSS must not grow with the collection (the 400-shard one holds
    40x the data)."""
    peak = {}
    for n, root in collections.items():
        res = subprocess.run([sys.executable, "-c", POOL_RSS, str(root)], cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=300, check=True)
        peak[n] = int(res.stdout.strip())
    data = {n: sum(p.stat().st_size for p in root.glob("shard-*"))
            for n, root in collections.items()}
    grown = peak[400] - peak[10]
    assert data[400] - data[10] > 60 * 2**20
    assert grown < 0.25 * (data[400] - data[10]), (peak, data)


def test_distill_streams_a_collection_of_many_shards(micro_world, collections, tmp_path,
                                                     monkeypatch):
    import cdlm.training.trajectories as trajectories
    root, _ = micro_world
    loads = []
    real_load = trajectories.load_shard
    monkeypatch.setattr(trajectories, "load_shard", lambda p: loads.append(p) or real_load(p))
    cfg = DistillConfig(lora_r=4, lora_alpha=8, steps=3, batch_size=4, max_shards=2,
                        log_every=1, device="cpu")
    distill(root / "teacher" / "model", collections[400], tmp_path / "s", cfg)
    assert (tmp_path / "s" / "adapter" / "adapter_model.safetensors").exists()
    assert len(loads) == 2                          # of 400 shards, only the pool's two


def _tensor_bytes(shard: Path) -> int:
    """A safetensors file is an 8-byte header length, the JSON header, then the tensors."""
    with open(shard, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return shard.stat().st_size - 8 - header


def test_collect_bounds_each_shard(micro_world, tmp_path):
    root, _ = micro_world
    cfg = CollectConfig(chunk_size=256, batch_size=4, max_shard_mb=0.02)   # 20 KiB of tensors
    index = collect(root / "teacher" / "model", [collect_prompts(root, 4)], tmp_path / "t", cfg)
    assert index["complete"] and index["chunk_size"] < 8 and index["num_chunks"] > 1
    shards = [tmp_path / "t" / n for n in index["shards"]]
    assert all(_tensor_bytes(s) <= 0.02 * 2**20 for s in shards)
    assert sum(len(load_shard(s)) for s in shards) == 8
