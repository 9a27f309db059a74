"""Resume is exact and leaves nothing behind (issue 11, item 12): a resumed distill equals the
uninterrupted run bit for bit, the log has each step once, temporaries go after a failure and
on rerun, a full disk (a real, tiny tmpfs) is reported as such, and rerunning finished stages
on a read-only output (a real read-only bind mount) does nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import cdlm.training.distill as distill_module
from launch import log_rows, run
from cdlm.training.collect import CollectConfig, collect
from cdlm.training.distill import DistillConfig, distill
from cdlm.training.io_utils import truncate_log
from cdlm.training.teacher import TeacherConfig, train_teacher
from cdlm.training.world.build import data_path
from cdlm.training.world.pipeline import collect_prompts

SETTINGS = dict(steps=10, batch_size=4, lora_r=4, lora_alpha=8, lr=3e-3, warmup=1, w_dlm=1.0,
                ckpt_every=4, log_every=1, device="cpu")


def _without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def test_resumed_distill_equals_the_uninterrupted_run_bit_for_bit(micro_world, tmp_path,
                                                                  monkeypatch):
    root, _ = micro_world
    teacher, traj = root / "teacher" / "model", root / "trajectories"
    whole = tmp_path / "whole"
    distill(teacher, traj, whole, DistillConfig(**SETTINGS))

    # A crash after step 6 was logged: the last checkpoint is step 4, rows 5-6 are in the log.
    real_append = distill_module.append_jsonl

    def crash_after_step_6(path, row):
        real_append(path, row)
        if row["step"] == 6:
            raise RuntimeError("simulated crash")

    broken = tmp_path / "broken"
    monkeypatch.setattr(distill_module, "append_jsonl", crash_after_step_6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(teacher, traj, broken, DistillConfig(**SETTINGS))
    monkeypatch.undo()
    assert torch.load(broken / "state.pt", weights_only=False)["step"] == 4
    assert [r["step"] for r in log_rows(broken)] == [1, 2, 3, 4, 5, 6]

    distill(teacher, traj, broken, DistillConfig(**SETTINGS))
    assert (broken / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (whole / "adapter" / "adapter_model.safetensors").read_bytes()
    assert _without_time(log_rows(broken)) == _without_time(log_rows(whole))   # each step once


def test_truncate_log_drops_rows_past_the_checkpoint_and_a_torn_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    truncate_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_stale_temporaries_are_removed_on_rerun(micro_world, tmp_path):
    root, _ = micro_world
    out = tmp_path / "student"
    out.mkdir()
    (out / ".state.pt.k3j2.tmp").write_bytes(b"half a checkpoint")
    (out / ".adapter.x81.tmp").mkdir()
    (out / ".adapter.x81.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (out / ".adapter.old").mkdir()
    distill(root / "teacher" / "model", root / "trajectories", out,
            DistillConfig(**{**SETTINGS, "steps": 2}))
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "config.json", "log.jsonl",
                                                     "state.pt"]
    traj = tmp_path / "traj"
    traj.mkdir()
    (traj / ".shard-00001.safetensors.9f.tmp").write_bytes(b"half a shard")
    collect(root / "teacher" / "model", [collect_prompts(root, 4)], traj,
            CollectConfig(chunk_size=4, batch_size=4))
    assert not [p for p in traj.iterdir() if p.name.endswith(".tmp")]


def _mount(*args: str) -> None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount here ({res.stderr.strip()}): needs root in a container "
                    "that allows mounts")


@contextmanager
def small_tmpfs(path: Path, size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Leave about `leave` bytes free on the filesystem of `disk`."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_is_reported_as_such_and_the_rerun_resumes(micro_world, tmp_path):
    root, _ = micro_world
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "student"
        out.mkdir()
        filler = _fill(disk, leave=12 * 1024)   # config and log fit, the checkpoint does not
        args = ["distill", "--base", str(root / "teacher" / "model"), "--trajectories",
                str(root / "trajectories"), "--out", str(out), "--device", "cpu",
                *[x for k, v in SETTINGS.items() if k != "device"
                  for x in (f"--{k.replace('_', '-')}", str(v))]]
        res = run(args, check=False)
        assert res.returncode == 1, res.stderr[-3000:]
        assert "error: no space left on device while writing" in res.stderr
        assert "state.pt" in res.stderr and "Traceback" not in res.stderr
        assert not [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".old"))]

        traj = disk / "traj"
        res = run(["collect", "--model", str(root / "teacher" / "model"), "--prompts",
                   str(collect_prompts(root, 4)), "--out", str(traj), "--chunk-size", "8",
                   "--device", "cpu"], check=False)
        assert res.returncode == 1 and "no space left on device while writing" in res.stderr
        assert "shard-00000.safetensors" in res.stderr and "Traceback" not in res.stderr
        assert not [p.name for p in traj.iterdir() if p.name.endswith(".tmp")]

        filler.unlink()                          # space again: the same commands finish
        run(args)
        assert (out / "adapter" / "adapter_model.safetensors").exists()
        assert [r["step"] for r in log_rows(out)] == list(range(1, SETTINGS["steps"] + 1))


@contextmanager
def read_only(path: Path):
    """`path` made read-only for real: a read-only bind mount as root (root ignores file
    modes), file modes otherwise."""
    if os.geteuid() == 0:
        view = path.with_name(path.name + "-ro")
        view.mkdir()
        _mount("--bind", str(path), str(view))
        try:
            _mount("-o", "remount,ro,bind", str(view))
            yield view
        finally:
            subprocess.run(["umount", "-l", str(view)], check=False)
        return
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)
    try:
        yield path
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_rerunning_finished_stages_on_a_read_only_output_does_nothing(micro_world, tmp_path):
    root, _ = micro_world
    world = tmp_path / "world"
    shutil.copytree(root, world)
    before = {p: p.read_bytes() for p in world.rglob("*") if p.is_file()}
    with read_only(world) as ro:
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")       # it really is read-only
        teacher = ro / "teacher" / "model"
        cfg = TeacherConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            steps=4, batch_size=8)
        assert train_teacher([data_path(ro, "math", "train")], ro / "tokenizer",
                             ro / "teacher", cfg) == teacher
        # The same arguments as the run that made it (the index records the teacher's path).
        collected = run(["collect", "--model", str(root / "teacher" / "model"), "--prompts",
                         str(ro / "data" / "collect-answer.jsonl"), "--out", str(ro / "trajectories"),
                         "--batch-size", "4", "--chunk-size", "4", "--device", "cpu"])
        assert "complete=True" in collected.stdout
        distilled = run(["distill", "--base", str(teacher), "--trajectories",
                         str(ro / "trajectories"), "--out", str(ro / "student")])
        assert distilled.stdout.strip().endswith("student/adapter")
    assert {p: p.read_bytes() for p in world.rglob("*") if p.is_file()} == before
