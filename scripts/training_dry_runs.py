"""Print `distill --dry-run` for Dream-7B and LLaDA-8B with the paper's presets on 4 GPUs.

The two config.json files (published shapes, SPEC section 4) are written to a temporary
directory: no weights are needed. This is the output quoted in docs/training.md.

    .venv/bin/python scripts/training_dry_runs.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "training"))

from real_configs import write_real_config  # noqa: E402
from cdlm.training.__main__ import main  # noqa: E402

RUNS = [  # (preset, trajectories: the paper's prompt counts, extra flags)
    ("dream-7b", 7500, []),
    ("llada-8b", 15000, []),
    ("llada-8b", 15000, ["--micro-batch-size", "16", "--gradient-checkpointing", "false"]),
]


def run_all() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for preset, count, extra in RUNS:
            base = write_real_config(Path(tmp) / preset, preset)
            argv = ["distill", "--base", str(base), "--trajectories", str(Path(tmp) / "none"),
                    "--out", str(Path(tmp) / "out"), "--preset", preset, "--dry-run",
                    "--processes", "4", "--assume-trajectories", str(count), *extra]
            print("$ python -m cdlm.training " + " ".join(
                a if not a.startswith(tmp) else a.replace(tmp, "$CFG") for a in argv))
            main(argv)
            print()


if __name__ == "__main__":
    run_all()
