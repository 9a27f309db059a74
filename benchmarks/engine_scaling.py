"""How the engine's throughput scales with concurrency, with no HTTP in the way.

The serving benchmark (`benchmarks/serve.py`) measures the whole server; this one drives
`LLMEngine` in-process so the engine's own batching gain can be read apart from the HTTP stack.
A closed loop keeps `c` requests in flight (a finished request is replaced at once, as a
benchmark client at `--max-concurrency c` does). Rows:

  c=1, c=4, c=16     one engine, continuous batching
  dp2 (c=8 + c=8)    two engines sharing one set of weights, each driven by its own thread with
                     one torch thread (what two cores can do when each runs its own batch)

Every configuration runs in each round, interleaved, and the table shows the median round
(the machine is shared and noisy: read the ratios).

    python benchmarks/engine_scaling.py --dataset /tmp/world-test.jsonl --chat \
        --dtype float32 --out docs/bench_engine_scaling.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from cdlm import LLM, SamplingParams
from cdlm.engine import LLMEngine
from serve import drive_engine   # benchmarks/serve.py: this script's directory is on sys.path


def closed_loop(engine: LLMEngine, prompts: list[list[int]], concurrency: int,
                params: SamplingParams, tag: str) -> tuple[int, int]:
    """Decode every prompt with `concurrency` in flight (the serving benchmark's offline
    driver); returns (output tokens, engine steps)."""
    steps_before = engine.stats.num_steps
    results = drive_engine(engine, prompts, concurrency, lambda: params, tag)
    return sum(r.output_tokens for r in results), engine.stats.num_steps - steps_before


def data_parallel(engines: list[LLMEngine], prompts: list[list[int]], concurrency: int,
                  params: SamplingParams, tag: str) -> tuple[int, int]:
    """Split the prompts round-robin over engines, one Python thread per engine."""
    results: list[tuple[int, int]] = [(0, 0)] * len(engines)

    def work(i: int) -> None:
        results[i] = closed_loop(engines[i], prompts[i::len(engines)], concurrency, params,
                                 f"{tag}-e{i}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(r[0] for r in results), sum(r[1] for r in results)


def load_prompts(llm: LLM, args: argparse.Namespace) -> list[list[int]]:
    rows = [json.loads(line) for line in Path(args.dataset).read_text().splitlines() if line]
    rows = rows[:args.num_prompts]
    tok = llm.tokenizer
    if args.chat:
        return [tok.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]
    return [tok.encode(r["prompt"], add_special_tokens=True) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the bundled model")
    ap.add_argument("--lora", default=None)
    ap.add_argument("--dataset", required=True, help='JSONL with a "prompt" field per line')
    ap.add_argument("--chat", action="store_true", help="apply the chat template")
    ap.add_argument("--num-prompts", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = ap.parse_args()

    torch.set_num_threads(1)
    llm = LLM(model=args.model, lora=args.lora, dtype=args.dtype, max_num_seqs=16)
    first = llm.engine
    second = LLMEngine(first.model, first.tokenizer, first.config, first.model_name)
    prompts = load_prompts(llm, args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    configs = {
        "c=1": lambda tag: closed_loop(first, prompts, 1, params, tag),
        "c=4": lambda tag: closed_loop(first, prompts, 4, params, tag),
        "c=16": lambda tag: closed_loop(first, prompts, 16, params, tag),
        "dp2 (c=8 + c=8)": lambda tag: data_parallel([first, second], prompts, 8, params, tag),
    }
    closed_loop(first, prompts[:8], 4, params, "warmup")
    rates: dict[str, list[float]] = {name: [] for name in configs}
    steps: dict[str, int] = {}
    for r in range(args.rounds):
        for name, run in configs.items():
            t0 = time.perf_counter()
            tokens, steps[name] = run(f"{name}-{r}")
            rates[name].append(tokens / (time.perf_counter() - t0))
    base = statistics.median(rates["c=1"])
    lines = [f"dtype {args.dtype}, {len(prompts)} prompts, max_tokens {args.max_tokens}, "
             f"{args.rounds} rounds (median shown), one torch thread per engine",
             "", "| configuration | output tok/s | vs c=1 | all rounds | engine steps |",
             "|---|---:|---:|---|---:|"]
    for name, values in rates.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.0f} | {med / base:.2f}x | "
                     f"{', '.join(f'{v:.0f}' for v in values)} | {steps[name]} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
