"""Real multi-process runs on CPU (gloo): torchrun and accelerate launch, 2 processes.

A 2-process `collect` writes the same shards as one process; a 2-process `distill` equals a
1-process run with the same arguments (the global batch is split, gradients summed); a run
killed with kill -9 resumes from its checkpoint with 2 processes and with 1; a rank that dies
makes the other fail within a bounded time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from launch import (adapter, assert_adapters_close, assert_curves_close, env, log_rows,
                    run, start, wait_for_log, command, ROOT, free_port)
from cdlm.training.collect import CollectConfig, collect
from cdlm.training.distill import DistillConfig, distill
from cdlm.training.world.pipeline import collect_prompts


STEPS = 60
SETTINGS = dict(steps=STEPS, batch_size=5, micro_batch_size=2, lora_r=4, lora_alpha=8, lr=3e-3,
                warmup=1, w_dlm=1.0, ckpt_every=3, log_every=1, device="cpu")


def distill_args(root: Path, out: Path, **overrides) -> list[str]:
    """`python -m cdlm.training distill` argv for SETTINGS (batch 5 over 2 ranks: shares of 3 and
    2 rows, micro-batches of 2: uneven shares and gradient accumulation both exercised)."""
    args = ["distill", "--base", str(root / "teacher" / "model"),
            "--trajectories", str(root / "trajectories"), "--out", str(out)]
    for k, v in {**SETTINGS, **overrides}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


@pytest.fixture(scope="module")
def reference(micro_world, tmp_path_factory) -> Path:
    """The uninterrupted 1-process distill every multi-process run is compared with (run in
    this process: one thread, like each torchrun worker)."""
    root, _ = micro_world
    out = tmp_path_factory.mktemp("ref") / "student"
    distill(root / "teacher" / "model", root / "trajectories", out, DistillConfig(**SETTINGS))
    return out


def test_two_process_collect_writes_the_same_shards(micro_world, tmp_path):
    root, _ = micro_world
    prompts = collect_prompts(root, 4)
    settings = dict(chunk_size=2, batch_size=2, device="cpu")
    one = collect(root / "teacher" / "model", [prompts], tmp_path / "one", CollectConfig(**settings))
    run(["collect", "--model", str(root / "teacher" / "model"), "--prompts", str(prompts),
         "--out", str(tmp_path / "two"), "--chunk-size", "2", "--batch-size", "2",
         "--device", "cpu"], "torchrun", 2)
    two = json.loads((tmp_path / "two" / "index.json").read_text())
    assert two["complete"] and two["shards"] == one["shards"] and len(one["shards"]) == 4
    for name in one["shards"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


@pytest.fixture(scope="module")
def two_process(micro_world, tmp_path_factory) -> Path:
    """The same run, uninterrupted, under torchrun with 2 processes."""
    root, _ = micro_world
    out = tmp_path_factory.mktemp("two") / "student"
    run(distill_args(root, out), "torchrun", 2)
    return out


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_distill_equals_one_process(micro_world, reference, two_process, tmp_path,
                                                launcher):
    root, _ = micro_world
    out = two_process
    if launcher == "accelerate":
        out = tmp_path / "student"
        run(distill_args(root, out), launcher, 2)
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2, "the launcher did not start 2 ranks in one group"
    # Each step logged once (rank 0 only), with the global batch's losses.
    assert_curves_close(log_rows(out), log_rows(reference))
    assert_adapters_close(adapter(out), adapter(reference))


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """pid of each worker rank under a torchrun process (from the workers' environment)."""
    ranks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "training" in " ".join(child.cmdline()):
            ranks[int(rank)] = child.pid
    return ranks


def _wait_exit(proc: subprocess.Popen, timeout: float) -> tuple[int, float]:
    t0 = time.time()
    rc = proc.wait(timeout=timeout)
    return rc, time.time() - t0


def test_killed_two_process_run_resumes_with_two_and_with_one(micro_world, reference,
                                                              two_process, tmp_path):
    root, _ = micro_world
    out = tmp_path / "killed"
    proc = start(distill_args(root, out), "torchrun", 2)
    try:
        wait_for_log(out, proc, 7)                 # past the checkpoint of step 6
        ranks: dict[int, int] = {}
        deadline = time.time() + 30
        while len(ranks) < 2 and time.time() < deadline:
            ranks = _rank_pids(proc)
        os.kill(ranks[1], signal.SIGKILL)          # one rank dies, for real
        rc, waited = _wait_exit(proc, timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0 and waited < 60, (rc, waited)   # the survivor was stopped: no hang
    assert not (out / "adapter").exists(), "the run finished before it was killed"
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in ranks.values())
    assert len(log_rows(out)) < STEPS
    copy = tmp_path / "killed-copy"
    shutil.copytree(out, copy)
    run(distill_args(root, out), "torchrun", 2)                    # resume with 2 processes
    distill(root / "teacher" / "model", root / "trajectories", copy,   # and with 1
            DistillConfig(**SETTINGS))
    for resumed in (out, copy):
        rows = log_rows(resumed)
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "duplicate or lost rows"
        assert_curves_close(rows, log_rows(reference))
        assert_adapters_close(adapter(resumed), adapter(reference))
        assert not [p.name for p in resumed.iterdir() if p.name.endswith((".tmp", ".old"))]
    # Resumed with the same 2 processes, the run is the uninterrupted one, bit for bit: the
    # data order and the optimizer were restored, not re-seeded.
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (two_process / "adapter" / "adapter_model.safetensors").read_bytes()
    assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in log_rows(out)] == \
        [{k: v for k, v in r.items() if k != "elapsed_s"} for r in log_rows(two_process)]


def test_a_dead_peer_fails_the_other_rank_within_a_bounded_time(micro_world, tmp_path):
    """Two ranks started by hand (no torchrun to stop the survivor): kill -9 one, the other
    must exit with an error by itself, not wait forever in a collective."""
    root, _ = micro_world
    out = tmp_path / "student"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        procs.append(subprocess.Popen(
            command(distill_args(root, out, steps=400, dist_timeout_s=60)), cwd=ROOT,
            env=env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        wait_for_log(out, procs[0], 3)
        procs[1].kill()
        rc, waited = _wait_exit(procs[0], timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert rc != 0 and waited < 60, (rc, waited)
