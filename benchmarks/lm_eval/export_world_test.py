"""Write the bundled world's test problems as JSONL (`prompt`, `answer`, ...) for the
lm-evaluation-harness task `cdlm_world.yaml`: the first N problems of each family's test split,
the same ones `python -m cdlm.training world` writes to runs/world/data/<family>-test.jsonl."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdlm.training.world.tasks import FAMILIES, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-family", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/lm_eval/world-test.jsonl"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = [p.to_json() for f in FAMILIES for p in generate(f, "test", args.per_family, args.seed)]
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(args.out)
    print(f"wrote {len(rows)} problems to {args.out}")


if __name__ == "__main__":
    main()
