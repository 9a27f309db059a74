"""Per-step cost of decoding vs prompt length: cached CDLM, the reference path, naive teacher.

Same model, same prompts, one run (ratios are what to read: the machine is noisy). A step is one
engine step (one forward pass over the request's current block plus scheduling and sampling).
The first pass of a cached request also commits the prompt; it is reported apart as "prefill".

    python benchmarks/step_cost.py --out docs/bench_step_cost.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cdlm.config import EngineConfig, ModelConfig
from cdlm.engine import LLMEngine
from cdlm.models.loader import load_model, save_pretrained
from cdlm.models.transformer import DiffusionLM
from cdlm.sampling_params import SamplingParams
from cdlm.tokenizer import Tokenizer
from cdlm.default_model import write_byte_tokenizer


def build_model(out: Path, hidden: int, layers: int, heads: int, device: str, dtype: str | None):
    vocab = write_byte_tokenizer(out)
    tok = Tokenizer.from_pretrained(out)
    config = ModelConfig(family="llada", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                         num_heads=heads, num_kv_heads=heads, intermediate_size=int(hidden * 8 / 3),
                         rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False,
                         mask_token_id=tok.token_to_id("<|mdm_mask|>"),
                         eos_token_id=tok.token_to_id("<|endoftext|>"), max_position_embeddings=8192)
    torch.manual_seed(0)
    save_pretrained(DiffusionLM(config), out)
    return load_model(out, device=device, dtype=dtype), tok


def interleaved_step_times(engines: dict[str, LLMEngine], prompt: list[int],
                           params: dict[str, SamplingParams], steps: int, sync
                           ) -> tuple[float, dict[str, list[float]]]:
    """One request per mode, stepped round-robin so every mode sees the same machine noise.
    Returns the cached request's first pass (prefill + first step) and later step times."""
    times: dict[str, list[float]] = {mode: [] for mode in engines}
    for mode, engine in engines.items():
        engine.add_request("bench", prompt, params[mode], mode=mode)
    for _ in range(steps + 1):
        for mode, engine in engines.items():
            sync()
            start = time.perf_counter()
            engine.step()
            sync()
            times[mode].append(time.perf_counter() - start)
    for engine in engines.values():
        engine.abort_request("bench")
    return times["cdlm"][0], {mode: t[1:] for mode, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-lens", default="128,256,512,1024,2048")
    ap.add_argument("--gen-len", type=int, default=256, help="generation window (naive sees it all)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode and length")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default=None, help="write Markdown here (and JSON beside it)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = build_model(Path(tmp), args.hidden, args.layers, args.heads, args.device, args.dtype)
    device = next(model.parameters()).device
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    config = EngineConfig(max_num_seqs=1, kv_cache_tokens=8192 + 512, threshold=0.9)
    engines = {mode: LLMEngine(model, tok, config) for mode in ("cdlm", "reference", "bidirectional")}
    # Forced schedules make the step count independent of random weights' confidences.
    four = SamplingParams(max_tokens=args.gen_len, temperature=0, ignore_eos=True, tokens_per_step=4)
    one = SamplingParams(max_tokens=args.gen_len, temperature=0, ignore_eos=True, tokens_per_step=1)
    params = {"cdlm": four, "reference": four, "bidirectional": one}
    gen = torch.Generator().manual_seed(0)
    rows = []
    interleaved_step_times(engines, [5] * 64, params, 1, sync)  # warm-up
    for plen in [int(x) for x in args.prompt_lens.split(",")]:
        prompt = torch.randint(0, 256, (plen,), generator=gen).tolist()
        prefill, times = interleaved_step_times(engines, prompt, params, args.steps, sync)
        row = {"prompt_len": plen, "cdlm_prefill_ms": prefill * 1e3,
               "cdlm_step_ms": statistics.median(times["cdlm"]) * 1e3,
               "reference_step_ms": statistics.median(times["reference"]) * 1e3,
               "naive_step_ms": statistics.median(times["bidirectional"]) * 1e3}
        rows.append(row)
        print(row, flush=True)

    base = rows[0]
    header = ("| prompt | CDLM cached ms/step | reference ms/step | naive ms/step | ref / cached | "
              "naive / cached | cached vs 128 | CDLM prefill ms |")
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['prompt_len']} | {r['cdlm_step_ms']:.2f} | {r['reference_step_ms']:.2f} | "
            f"{r['naive_step_ms']:.2f} | {r['reference_step_ms'] / r['cdlm_step_ms']:.1f}x | "
            f"{r['naive_step_ms'] / r['cdlm_step_ms']:.1f}x | "
            f"{r['cdlm_step_ms'] / base['cdlm_step_ms']:.2f}x | {r['cdlm_prefill_ms']:.1f} |")
    table = "\n".join(lines)
    setup = (f"device={device}, dtype={next(model.parameters()).dtype}, model: LLaDA layout, "
             f"hidden={args.hidden}, layers={args.layers}, heads={args.heads}, block=32, "
             f"generation window={args.gen_len}, torch threads={torch.get_num_threads()}, "
             f"median of {args.steps} steps")
    print(setup)
    print(table)
    if args.out:
        out = Path(args.out)
        out.write_text(f"# Per-step cost vs prompt length\n\n{setup}\n\n{table}\n")
        out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
