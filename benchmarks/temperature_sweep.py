"""Accuracy and steps per block of the bundled student across sampling temperatures.

Temperature decides which token is drawn, never how many are finalised: the confidence the
threshold compares is the model's untempered probability of the drawn token (SPEC section 2,
as LLaDA's and Fast-dLLM's samplers do), and temperatures below 1e-5 are greedy. So low
temperatures must behave like greedy decoding, and high ones trade accuracy for diversity at
about the same number of steps.

    python benchmarks/temperature_sweep.py --per-family 200 --out docs/temperature_sweep.md

The world's held-out test problems, chat-templated, through `cdlm.LLM` (cached path), batched
(seeded sampling is batch-invariant), one seed per problem.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdlm import LLM, SamplingParams
from cdlm.training.data import chat_prompt_ids
from cdlm.training.world.tasks import FAMILIES, final_answer, generate

TEMPERATURES = (0.0, 1e-9, 1e-3, 0.1, 0.3, 0.5, 0.7, 1.0)


def sweep(llm: LLM, problems: dict[str, list], temperatures, max_tokens: int) -> list[dict]:
    rows = []
    for temperature in temperatures:
        row = {"temperature": temperature}
        for family, items in problems.items():
            prompts = [chat_prompt_ids(llm.tokenizer, p.prompt) for p in items]
            params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i)
                      for i in range(len(items))]
            outs = llm.generate(prompts, params)
            correct = sum(final_answer(o.text) == p.result for o, p in zip(outs, items))
            blocks = sum(o.outputs[0].num_blocks for o in outs)
            steps = sum(o.steps for o in outs)
            tokens = sum(len(o.token_ids) for o in outs)
            row[family] = {"accuracy": 100.0 * correct / len(items),
                           "steps_per_block": steps / max(blocks, 1),
                           "tokens_per_step": tokens / max(steps, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    families = [k for k in rows[0] if k != "temperature"]
    head = "| temperature | " + " | ".join(
        f"{f} accuracy | {f} steps/block | {f} tokens/step" for f in families) + " |"
    lines = [head, "|---:|" + "---:|" * (3 * len(families))]
    for r in rows:
        cells = [f"{r[f]['accuracy']:.1f} | {r[f]['steps_per_block']:.2f} | "
                 f"{r[f]['tokens_per_step']:.2f}" for f in families]
        lines.append(f"| {r['temperature']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the bundled model")
    ap.add_argument("--lora", default=None)
    ap.add_argument("--per-family", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperatures", default=",".join(f"{t:g}" for t in TEMPERATURES))
    ap.add_argument("--out", type=Path, help="write the Markdown table here")
    args = ap.parse_args()
    llm = LLM(args.model, args.lora, max_num_seqs=64)
    problems = {f: generate(f, "test", args.per_family, seed=0) for f in FAMILIES}
    rows = sweep(llm, problems, [float(t) for t in args.temperatures.split(",")],
                 args.max_tokens)
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
