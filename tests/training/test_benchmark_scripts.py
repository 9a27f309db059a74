"""The benchmark scripts run end to end (tiny sizes): their tables are what docs/ cites."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_student_sweep_prints_accuracy_and_steps_per_threshold(micro_world):
    root, report = micro_world
    gen_len = report["config"]["gen_len"]
    adapter = str(root / "student" / "adapter")
    out = _run("benchmarks/student_sweep.py", "--world", str(root), "--thresholds", "0.5,0.9",
               "--naive", adapter, "none")
    rows = [line for line in out.splitlines() if line.startswith(f"| {adapter} |")
            or line.startswith("| none |")]
    assert len(rows) == 6          # 2 adapters x (1 token/step + 2 thresholds)
    naive = [r for r in rows if "1 token/step" in r][0]
    # One token per step: a request takes at most one step per token of the generation window.
    steps = [float(cell.split("/")[1]) for cell in naive.strip("|").split("|")[2:]]
    assert all(0 < s <= gen_len for s in steps)


def test_engine_scaling_table(tmp_path):
    from cdlm.training.world.tasks import generate
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n"
                            for p in generate("math", "test", 6, seed=0)))
    out = _run("benchmarks/engine_scaling.py", "--dataset", str(data), "--chat",
               "--num-prompts", "6", "--rounds", "1", "--out", str(tmp_path / "table.md"))
    for name in ("c=1", "c=4", "c=16", "dp2 (c=8 + c=8)"):
        assert f"| {name} |" in out
    assert "| c=1 | " in (tmp_path / "table.md").read_text()


def test_standalone_temperature_sweep_on_the_bundled_model(tmp_path):
    from cdlm.default_model import default_model
    from cdlm.training.io_utils import write_jsonl
    from cdlm.training.world.tasks import generate
    for family in ("math", "code"):
        write_jsonl(tmp_path / f"{family}-test.jsonl",
                    [{"prompt": p.prompt, "result": p.result}
                     for p in generate(family, "test", 3, seed=0)])
    teacher, student = default_model()
    out = _run("benchmarks/temperature_sweep_standalone.py", "--model", teacher, "--lora",
               student, "--data", str(tmp_path), "--per-family", "3", "--temperatures", "0,1e-9")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["temperature"] for r in rows] == [0.0, 1e-9]
    # Below 1e-5 is greedy: the same accuracy and steps as temperature 0.
    assert rows[0]["math"] == rows[1]["math"] and rows[0]["code"] == rows[1]["code"]
