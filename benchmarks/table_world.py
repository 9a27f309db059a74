"""The CDLM table of the bundled default model, re-measured on this machine.

    python benchmarks/table_world.py [--limit N] [--out docs]

Regenerates the small world's test prompts from their seeds (no data files needed), then runs
`training.evaluate` on `cdlm/assets/default` (teacher + CDLM student) through `cdlm.LLM`,
batch 1, with the world preset's eval settings at the bundled student's threshold (the one
chosen on validation when it was built, from the bundled table.json): both naive teachers,
teacher + threshold (0.9 and the student's), teacher at the student's step budget, CDLM
student. Writes table_world.json and table_world.md into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cdlm.training.evaluate import evaluate, markdown_table  # noqa: E402
from cdlm.training.io_utils import write_jsonl  # noqa: E402
from cdlm.training.world.pipeline import WorldConfig  # noqa: E402
from cdlm.training.world.tasks import FAMILIES, generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--assets", default=str(ROOT / "cdlm" / "assets" / "default"))
    parser.add_argument("--limit", type=int, default=0, help="prompts per family (0: all)")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    world = WorldConfig.preset("full")
    assets = Path(args.assets)
    with tempfile.TemporaryDirectory() as tmp:
        tests = {}
        for family in FAMILIES:
            path = Path(tmp) / f"{family}-test.jsonl"
            write_jsonl(path, [p.to_json() for p in generate(family, "test",
                                                                 world.test_per_family, seed=0)])
            tests[family] = path
        bundled = json.loads((assets / "table.json").read_text())["config"]
        cfg = dataclasses.replace(world.eval, gen_len=world.teacher.gen_len, limit=args.limit,
                                  threshold=bundled["threshold"])
        report = evaluate(assets / "teacher", assets / "student", tests, Path(tmp) / "eval", cfg)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "eval" / "table.json", out / "table_world.json")
        shutil.copy(Path(tmp) / "eval" / "table.md", out / "table_world.md")
    print(markdown_table(report))


if __name__ == "__main__":
    main()
