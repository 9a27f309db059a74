"""Accuracy and steps of CDLM students across confidence thresholds (the recipe ablation).

    python benchmarks/student_sweep.py --world runs/world-clean \
        --thresholds 0.9,0.95,0.97,0.99 --naive \
        runs/exp/C/adapter runs/exp/E/adapter ...

For each adapter (on the world's teacher) and threshold: exact-answer accuracy and mean steps
per request on the world's held-out test problems, greedy, through `cdlm.LLM` with the cached
(`cdlm`) path. Requests are batched: greedy outputs are batch-invariant (tests/test_exactness.py
checks batched == one by one), so this measures accuracy and steps only, not latency (the
batch-1 latency table is `python -m cdlm.training eval`). `--naive` adds a row per adapter at one
token per step, the student's accuracy with no parallel finalisation; the adapter `none` is the
teacher's weights under the block-causal mask (the student before training).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cdlm import LLM, SamplingParams
from cdlm.training.data import chat_prompt_ids
from cdlm.training.io_utils import read_jsonl
from cdlm.training.world.tasks import FAMILIES, final_answer


def score(llm: LLM, rows: list[dict], params: SamplingParams) -> tuple[float, float]:
    prompts = [chat_prompt_ids(llm.tokenizer, r["prompt"]) for r in rows]
    outs = llm.generate(prompts, params, mode="cdlm")
    correct = sum(final_answer(o.text) == r["result"] for o, r in zip(outs, rows))
    return 100.0 * correct / len(rows), sum(o.steps for o in outs) / len(outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, help="a `python -m cdlm.training world` directory")
    ap.add_argument("--thresholds", default="0.9,0.95,0.97,0.99")
    ap.add_argument("--naive", action="store_true", help="also one token per step")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 | ...")
    ap.add_argument("adapters", nargs="+", help="LoRA adapter directories, or `none`")
    args = ap.parse_args()
    root = Path(args.world)
    rows = {f: read_jsonl(root / "data" / f"{f}-test.jsonl") for f in FAMILIES}
    settings: list[tuple[str, SamplingParams]] = []
    if args.naive:
        settings.append(("1 token/step", SamplingParams(max_tokens=args.max_tokens,
                                                        temperature=0.0, tokens_per_step=1)))
    for t in (float(x) for x in args.thresholds.split(",")):
        settings.append((f"threshold {t}", SamplingParams(max_tokens=args.max_tokens,
                                                         temperature=0.0, threshold=t)))
    print("| adapter | policy | " + " | ".join(f"{f} acc / steps" for f in FAMILIES) + " |")
    print("|---|---|" + "---:|" * len(FAMILIES))
    for adapter in args.adapters:
        llm = LLM(model=str(root / "teacher" / "model"),
                  lora=None if adapter == "none" else adapter, max_num_seqs=64,
                  dtype=args.dtype)
        for name, params in settings:
            cells = [score(llm, rows[f], params) for f in FAMILIES]
            print(f"| {adapter} | {name} | "
                  + " | ".join(f"{acc:.1f} / {steps:.2f}" for acc, steps in cells) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
