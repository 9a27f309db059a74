"""Real launches of `python -m cdlm.training` for the tests: one process, torchrun, accelerate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def env(**extra: str) -> dict[str, str]:
    """One thread per process (what torchrun sets), the checkout importable, no progress bars."""
    out = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    out.update(extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(stage_args: list[str], launcher: str = "python", nproc: int = 1) -> list[str]:
    if launcher == "python":
        return [sys.executable, "-m", "cdlm.training", *stage_args]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc),
                "-m", "cdlm.training", *stage_args]
    if launcher == "accelerate":
        # On a machine without GPUs `accelerate launch --num_processes N` alone runs ONE
        # process; --multi_gpu selects its torchrun launcher (gloo on CPU).
        return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m", "cdlm.training", *stage_args]
    raise ValueError(launcher)


def run(stage_args: list[str], launcher: str = "python", nproc: int = 1,
        timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(command(stage_args, launcher, nproc), cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{launcher} x{nproc} {' '.join(stage_args[:1])} failed "
                             f"({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def start(stage_args: list[str], launcher: str = "python", nproc: int = 1,
          **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen(command(stage_args, launcher, nproc), cwd=ROOT, env=env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def log_rows(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def wait_for_log(out: Path, proc: subprocess.Popen, steps: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(log_rows(out)) < steps:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {steps}: {proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"no step {steps} within {timeout} s")
        time.sleep(0.01)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_adapters_close(a: dict, b: dict, atol: float = 1e-6, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=rtol), \
            (k, (a[k] - b[k]).abs().max().item())
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k), "adapter never trained"


def assert_curves_close(a: list[dict], b: list[dict], atol: float = 2e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in ("loss", "distill", "cons", "dlm"):
            assert abs(x[k] - y[k]) <= atol + 1e-4 * abs(y[k]), (x["step"], k, x[k], y[k])
