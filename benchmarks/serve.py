#!/usr/bin/env python
"""Online serving benchmark, in the manner of `vllm bench serve`.

Sends N prompts to a running cdlm server (streaming /v1/completions) at a fixed concurrency
and/or request rate, and reports per-request latency percentiles and aggregate throughput:

- TTFT: time to the first streamed chunk (= the first finished block: a block is final text)
- TPOT: (e2e - TTFT) / (output tokens - 1), per request
- ITL: inter-chunk latency (= time between finished blocks), over all chunks
- E2E: request latency
- output tokens/s (aggregate), requests/s, mean denoising steps per block and tokens per
  step (from the `denoising_steps` / `num_blocks` usage fields), and the server's mean batch
  size per engine step (from /metrics).

Example (server started with `cdlm serve`):
    python benchmarks/serve.py --num-prompts 64 --max-concurrency 16 --output-len 128 \
        --ignore-eos --result-json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import httpx

WORDS = ("time person year way day thing man world life hand part child eye woman place work "
         "week case point number group problem fact water river house story money month lot "
         "right study book job word business issue side kind head service friend father power "
         "hour game line end member law car city community name president team minute idea "
         "body information back parent face others level office door health art war history "
         "party result change morning reason research girl guy moment air teacher force "
         "education").split()


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    steps: int = 0
    blocks: int = 0


def make_prompts(n: int, input_len: int, seed: int, dataset: str | None = None) -> list[str]:
    """`n` prompts: from a JSONL dataset's "prompt" field (shuffled by seed, cycled), else
    synthetic prompts of about `input_len` words, distinct from each other."""
    rng = random.Random(seed)
    if dataset:
        with open(dataset) as handle:
            pool = [json.loads(line)["prompt"] for line in handle if line.strip()]
        rng.shuffle(pool)
        return [pool[i % len(pool)] for i in range(n)]
    return [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(max(1, input_len - 1)))
            for i in range(n)]


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, model: str,
                      prompt: str) -> RequestResult:
    body = {"model": model, "max_tokens": args.output_len, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": args.temperature}
    if args.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.threshold is not None:
        body["threshold"] = args.threshold
    if args.tokens_per_step is not None:
        body["tokens_per_step"] = args.tokens_per_step
    res = RequestResult(start=time.perf_counter())
    last = res.start
    try:
        endpoint = "/v1/chat/completions" if args.chat else "/v1/completions"
        async with client.stream("POST", endpoint, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", "error")
                    return res
                now = time.perf_counter()
                choice = (obj.get("choices") or [{}])[0]
                # Text chunks only (a chat stream may open with a role-only delta).
                if "text" in choice or "content" in choice.get("delta", {}):
                    if res.chunks == 0:
                        res.ttft = now - res.start
                    else:
                        res.itl.append(now - last)
                    res.chunks += 1
                    last = now
                usage = obj.get("usage")
                if usage:
                    res.prompt_tokens = usage["prompt_tokens"]
                    res.output_tokens = usage["completion_tokens"]
                    res.steps = usage.get("denoising_steps", 0)
                    res.blocks = usage.get("num_blocks", 0)
        res.e2e = time.perf_counter() - res.start
        res.ok = res.chunks > 0
        if not res.ok:
            res.error = "no chunks"
    except Exception as exc:  # noqa: BLE001 - report, do not crash the run
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def _metric_sums(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("cdlm:batch_size_per_step_") and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            if key.endswith("_sum") or key.endswith("_count"):
                out[key] = float(value)
    return out


async def run(args: argparse.Namespace) -> dict:
    headers = {}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    limits = httpx.Limits(max_connections=max(args.max_concurrency or 0, 64),
                          max_keepalive_connections=max(args.max_concurrency or 0, 64))
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        model = args.model
        if model is None:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = make_prompts(args.num_prompts, args.input_len, args.seed, args.dataset)
        if args.warmup:
            await asyncio.gather(*[one_request(client, args, model, p)
                                   for p in make_prompts(args.warmup, args.input_len,
                                                         args.seed + 1, args.dataset)])
        before = _metric_sums((await client.get("/metrics")).text)
        sem = asyncio.Semaphore(args.max_concurrency or len(prompts))
        rng = random.Random(args.seed)

        async def limited(p: str) -> RequestResult:
            async with sem:
                return await one_request(client, args, model, p)

        t0 = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if args.request_rate not in (None, float("inf")):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        after = _metric_sums((await client.get("/metrics")).text)
    return summarize(args, model, results, duration, before, after)


def drive_engine(engine: Any, prompts: list, concurrency: int, params: Callable[[], Any],
                 tag: str, encode: Callable[[Any], Any] | None = None) -> list[RequestResult]:
    """A closed loop on an in-process `LLMEngine`: keep `concurrency` requests in flight (a
    finished one is replaced at once, as a client at `--max-concurrency` does) until every
    prompt is done. `params()` makes each request's SamplingParams; `encode`, if given, turns
    a prompt into what the engine takes, inside the request's timed span."""
    pending = list(enumerate(prompts))
    results: dict[int, RequestResult] = {}
    last: dict[int, float] = {}
    in_flight = 0
    while pending or engine.has_unfinished_requests():
        while pending and in_flight < concurrency:
            i, prompt = pending.pop(0)
            results[i] = RequestResult(start=time.perf_counter())
            engine.add_request(f"{tag}-{i}", encode(prompt) if encode else prompt, params())
            in_flight += 1
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            i = int(o.request_id.rsplit("-", 1)[1])
            r = results[i]
            if r.chunks == 0:
                r.ttft = now - r.start
            else:
                r.itl.append(now - last[i])
            last[i] = now
            r.chunks += 1
            if o.finished:
                in_flight -= 1
                r.ok, r.e2e = True, now - r.start
                r.prompt_tokens, r.output_tokens = len(o.prompt_token_ids), len(o.token_ids)
                r.steps, r.blocks = o.steps, o.outputs[0].num_blocks
    return [results[i] for i in sorted(results)]


def run_offline(args: argparse.Namespace) -> dict:
    """The same workload straight on an in-process LLMEngine (no HTTP): what the engine alone
    does at this concurrency, to separate server overhead from engine scaling."""
    import torch

    from cdlm.engine import LLMEngine
    from cdlm.sampling_params import SamplingParams

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    engine = _OFFLINE.get("engine")
    if engine is None:
        engine = _OFFLINE["engine"] = LLMEngine.from_pretrained()
    conc = args.max_concurrency or args.num_prompts

    def params() -> SamplingParams:
        return SamplingParams(max_tokens=args.output_len, temperature=args.temperature,
                              ignore_eos=args.ignore_eos, threshold=args.threshold,
                              tokens_per_step=args.tokens_per_step)

    def chat(prompt: str) -> list[int]:
        return engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])

    def drive(prompts: list[str], tag: str) -> list[RequestResult]:
        return drive_engine(engine, prompts, conc, params, tag, chat if args.chat else None)

    drive(make_prompts(args.warmup, args.input_len, args.seed + 1, args.dataset), f"w{time.time_ns()}")
    steps0 = engine.stats.num_steps
    t0 = time.perf_counter()
    results = drive(make_prompts(args.num_prompts, args.input_len, args.seed, args.dataset),
                    f"r{time.time_ns()}")
    duration = time.perf_counter() - t0
    n_steps = engine.stats.num_steps - steps0
    seqs = sum(r.steps for r in results)
    before = {"cdlm:batch_size_per_step_sum": 0.0, "cdlm:batch_size_per_step_count": 0.0}
    after = {"cdlm:batch_size_per_step_sum": float(seqs),
             "cdlm:batch_size_per_step_count": float(n_steps)}
    return summarize(args, "offline:" + engine.model_name, results, duration, before, after)


_OFFLINE: dict = {}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(args, model, results: list[RequestResult], duration: float,
              before: dict, after: dict) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    steps = sum(r.steps for r in ok)
    blocks = sum(r.blocks for r in ok)
    ttft = [r.ttft for r in ok]
    e2e = [r.e2e for r in ok]
    itl = [x for r in ok for x in r.itl]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    d_sum = after.get("cdlm:batch_size_per_step_sum", 0) - before.get(
        "cdlm:batch_size_per_step_sum", 0)
    d_cnt = after.get("cdlm:batch_size_per_step_count", 0) - before.get(
        "cdlm:batch_size_per_step_count", 0)

    def stats(xs: list[float]) -> dict:
        return {"mean": statistics.fmean(xs) if xs else float("nan"),
                "p50": _pct(xs, 50), "p99": _pct(xs, 99)}

    return {
        "config": {k: v for k, v in vars(args).items() if k != "api_key"} | {"model": model},
        "environment": {"python": platform.python_version(), "machine": platform.machine(),
                        "cpus": os.cpu_count()},
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput_rps": len(ok) / duration,
        "output_throughput_tok_s": out_tokens / duration,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "mean_steps_per_block": steps / blocks if blocks else float("nan"),
        "mean_tokens_per_step": out_tokens / steps if steps else float("nan"),
        "server_mean_batch_size_per_step": d_sum / d_cnt if d_cnt else float("nan"),
        "server_engine_steps": d_cnt,
        "ttft_s": stats(ttft),
        "tpot_s": stats(tpot),
        "itl_s": stats(itl),
        "e2e_s": stats(e2e),
        "requests": [asdict(r) for r in results] if args.save_requests else None,
    }


def print_table(s: dict) -> None:
    c = s["config"]
    rate = c["request_rate"]
    print("=" * 62)
    print(f" cdlm serving benchmark  model={c['model']}")
    print(f" prompts={c['num_prompts']} concurrency={c['max_concurrency'] or 'unbounded'} "
          f"rate={'inf' if rate in (None, float('inf')) else rate} "
          f"input~{c['input_len']}w output={c['output_len']} ignore_eos={c['ignore_eos']}")
    print("-" * 62)
    rows = [
        ("Successful requests", f"{s['completed']}"),
        ("Failed requests", f"{s['failed']}"),
        ("Benchmark duration (s)", f"{s['duration_s']:.2f}"),
        ("Total output tokens", f"{s['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{s['request_throughput_rps']:.2f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput_tok_s']:.1f}"),
        ("Mean denoising steps per block", f"{s['mean_steps_per_block']:.2f}"),
        ("Mean tokens per step", f"{s['mean_tokens_per_step']:.2f}"),
        ("Server mean batch size per step", f"{s['server_mean_batch_size_per_step']:.2f}"),
    ]
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        label = {"ttft_s": "TTFT", "tpot_s": "TPOT", "itl_s": "ITL (inter-block)",
                 "e2e_s": "E2E latency"}[name]
        for q in ("mean", "p50", "p99"):
            rows.append((f"{label} {q} (ms)", f"{s[name][q] * 1000:.2f}"))
    for k, v in rows:
        print(f" {k:<40}{v:>20}")
    if s["errors"]:
        print(" errors:", *s["errors"], sep="\n  ")
    print("=" * 62)


def markdown_table(levels: list, chosen: dict, runs: dict) -> str:
    base = chosen[levels[0]]["output_throughput_tok_s"]
    head = ("| concurrency | requests | output tok/s | vs first | all rounds tok/s | req/s | "
            "TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) | "
            "E2E p50 / p99 (ms) | steps/block | tokens/step | batch/step |\n")
    head += "|" + "---|" * 13 + "\n"
    rows = []
    for c in levels:
        s = chosen[c]

        def pp(name: str) -> str:
            return f"{s[name]['p50'] * 1000:.1f} / {s[name]['p99'] * 1000:.1f}"

        rows.append(
            f"| {c} | {s['completed']} | {s['output_throughput_tok_s']:.1f} | "
            f"{s['output_throughput_tok_s'] / base:.2f}x | "
            + ", ".join(f"{x['output_throughput_tok_s']:.0f}" for x in runs[c])
            + f" | {s['request_throughput_rps']:.2f} | {pp('ttft_s')} | {pp('tpot_s')} | "
            f"{pp('itl_s')} | {pp('e2e_s')} | {s['mean_steps_per_block']:.2f} | "
            f"{s['mean_tokens_per_step']:.2f} | {s['server_mean_batch_size_per_step']:.2f} |")
    return head + "\n".join(rows) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--api-key", default=os.environ.get("CDLM_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=str, default=None,
                   help="requests in flight at most (default: unbounded); a comma list "
                        "(1,4,16) sweeps them, interleaved round by round")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the sweep; the table shows the median-throughput round of "
                        "each concurrency (robust on a shared, noisy machine)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in req/s (default inf: all at once)")
    p.add_argument("--input-len", type=int, default=32, help="prompt length in words")
    p.add_argument("--dataset", default=None,
                   help='JSONL file with a "prompt" field per line (instead of synthetic prompts)')
    p.add_argument("--chat", action="store_true",
                   help="send prompts as a user message to /v1/chat/completions (chat template)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--ignore-eos", action="store_true",
                   help="decode exactly --output-len tokens (comparable runs)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="finalise exactly k tokens per step (1 = the naive baseline)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--offline", action="store_true",
                   help="no server: run the same workload on an in-process LLMEngine "
                        "(separates server overhead from engine scaling)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads for --offline")
    p.add_argument("--result-json", default=None)
    p.add_argument("--markdown", default=None, help="write the summary table as markdown")
    p.add_argument("--save-requests", action="store_true", help="per-request data in the JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [None] if args.max_concurrency in (None, "") else \
        [int(x) for x in str(args.max_concurrency).split(",")]
    runs: dict = {c: [] for c in levels}
    for r in range(args.rounds):
        for c in levels:
            one = argparse.Namespace(**{**vars(args), "max_concurrency": c})
            summary = run_offline(one) if args.offline else asyncio.run(run(one))
            summary["round"] = r
            runs[c].append(summary)
            if args.rounds > 1 or len(levels) > 1:
                print(f"round {r} concurrency {c}: "
                      f"{summary['output_throughput_tok_s']:.1f} output tok/s", flush=True)
    chosen = {}
    for c, rs in runs.items():
        rs_sorted = sorted(rs, key=lambda x: x["output_throughput_tok_s"])
        chosen[c] = rs_sorted[len(rs_sorted) // 2]
        print_table(chosen[c])
    failed = sum(x["failed"] for rs in runs.values() for x in rs)
    if len(levels) > 1 and levels[0] is not None:
        base = chosen[levels[0]]["output_throughput_tok_s"]
        print("output tok/s relative to concurrency %d:" % levels[0])
        for c in levels:
            tputs = [x["output_throughput_tok_s"] for x in runs[c]]
            print(f"  c={c:<4} median {chosen[c]['output_throughput_tok_s']:8.1f} tok/s "
                  f"({chosen[c]['output_throughput_tok_s'] / base:.2f}x)   all rounds: "
                  + ", ".join(f"{t:.0f}" for t in tputs))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(levels, chosen, runs))
    if args.result_json:
        out = chosen[levels[0]] if len(levels) == 1 and args.rounds == 1 else {
            "median_by_concurrency": {str(c): chosen[c] for c in levels},
            "all_rounds": {str(c): rs for c, rs in runs.items()},
        }
        with open(args.result_json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
