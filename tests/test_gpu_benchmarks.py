"""The GPU benchmarks and the one-shot check run end to end at tiny shapes on CPU, so the script
a GPU session relies on cannot rot between the (rare) GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_gpu_step_tiny_on_cpu_prints_the_floor_columns(tmp_path):
    out_json = tmp_path / "bench.json"
    out = _run("benchmarks/gpu_step.py", "--device", "cpu", "--tiny", "--out", str(out_json))
    assert "| step ms | floor ms | step/floor |" in out
    result = json.loads(out_json.read_text())
    assert result["copy_bandwidth_bytes_per_s"] > 0 and result["matmul_flops_per_s"] > 0
    batch1 = [r for r in result["rows"] if r["batch"] == 1 and r["kind"] == "all"]
    assert {r["family"] for r in batch1} == {"dream", "llada"}
    for row in batch1:
        assert row["ratio_to_floor"] > 0 and row["tokens_per_s"] > 0
        assert row["floor_ms"] > 0 and row["step_ms"] > 0
    kinds = {r["kind"] for r in result["rows"]}
    assert {"plain", "commit", "admission"} <= kinds
    for info in result["families"].values():
        assert info["attention"] == "torch" and info["kv_bytes_per_request"] > 0


def test_ar_baseline_tiny_on_cpu(tmp_path):
    out_json = tmp_path / "ar.json"
    out = _run("benchmarks/ar_baseline.py", "--device", "cpu", "--tiny", "--out", str(out_json))
    assert "| batch | tokens/s |" in out
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 4] and all(r["tokens_per_s"] > 0 for r in rows)


def test_gpu_check_script_is_executable_and_parses():
    script = ROOT / "scripts" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for piece in ("tests/test_cuda.py", "benchmarks/gpu_step.py", "benchmarks/ar_baseline.py"):
        assert piece in text
