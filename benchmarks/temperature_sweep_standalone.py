"""The temperature sweep with nothing but `cdlm.LLM` (no cdlm.training import), so that an older
engine can run it on the same checkpoint side by side:

    PYTHONPATH=/path/to/old/checkout python benchmarks/temperature_sweep_standalone.py \
        --model cdlm/assets/default/teacher --lora cdlm/assets/default/student \
        --data runs/world/data --per-family 200

Prints one JSON line per temperature: accuracy (final `#### N` equals the answer's) and steps
per block for each family of the world's held-out test split.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from cdlm import LLM, SamplingParams

FINAL = re.compile(r"####\s*(-?\d+)")


def final_answer(text: str) -> int | None:
    found = FINAL.findall(text)
    return int(found[-1]) if found else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--lora", required=True)
    ap.add_argument("--data", required=True, help="directory with <family>-test.jsonl")
    ap.add_argument("--per-family", type=int, default=200)
    ap.add_argument("--temperatures", default="0,1e-9,0.001,0.1,0.3,0.5,0.7,1.0")
    args = ap.parse_args()
    llm = LLM(model=args.model, lora=args.lora)
    problems = {}
    for path in sorted(Path(args.data).glob("*-test.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        problems[path.name.split("-")[0]] = rows[:args.per_family]
    for temperature in (float(t) for t in args.temperatures.split(",")):
        row: dict = {"temperature": temperature}
        for family, rows in problems.items():
            params = [SamplingParams(max_tokens=64, temperature=temperature, seed=i)
                      for i in range(len(rows))]
            outs = llm.chat([[{"role": "user", "content": r["prompt"]}] for r in rows], params)
            correct = sum(final_answer(o.text) == r["result"] for o, r in zip(outs, rows))
            blocks = sum(max(1, -(-len(o.token_ids) // 32)) for o in outs)
            row[family] = {"accuracy": round(100 * correct / len(rows), 1),
                           "steps_per_block": round(sum(o.steps for o in outs) / blocks, 2)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
