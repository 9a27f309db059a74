"""The engine's packed step at the real Dream-7B / LLaDA-8B shapes, against its own floor.

Random bf16 weights (the hubs are unreachable) with a forced tokens-per-step schedule, so the
work per step does not depend on what random weights are confident about. Each request has a
512-token prompt and generates 256 tokens (ignore_eos). A closed loop keeps `batch` requests
running: a new request is admitted as soon as one finishes, starts are staggered so that
commits spread over steps as they do in serving. Every step is timed (device synchronised) and
classified: `admission` (a prompt was admitted), `commit` (a completed block was committed),
`plain`.

The floor is measured in the same run: max(weight bytes / copy bandwidth, FLOPs / matmul
rate), with the copy bandwidth from a large device-to-device copy (bytes read + written per
second) and the matmul rate from a large GEMM in the model's dtype; a step's FLOPs are counted
from what the step computed (its packed tokens through every linear layer, attention over
`q_len x kv_end` per segment, the LM head over every block position).

    python benchmarks/gpu_step.py --out docs/bench_gpu.json           # CUDA, real shapes
    python benchmarks/gpu_step.py --device cpu --tiny                 # same code, tiny, CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cdlm.config import EngineConfig, ModelConfig
from cdlm.default_model import write_byte_tokenizer
from cdlm.engine import LLMEngine
from cdlm.kv_cache import KVCachePool
from cdlm.models.transformer import DiffusionLM
from cdlm.sampling_params import SamplingParams
from cdlm.tokenizer import Tokenizer

REAL_SHAPES = {
    # SPEC section 4.
    "llada": dict(vocab_size=126464, hidden_size=4096, num_layers=32, num_heads=32,
                  num_kv_heads=32, intermediate_size=12288, rope_theta=500000.0, norm_eps=1e-5,
                  qkv_bias=False, mask_token_id=126336, eos_token_id=126081),
    "dream": dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
                  num_kv_heads=4, intermediate_size=18944, rope_theta=1e6, norm_eps=1e-6,
                  qkv_bias=True, mask_token_id=151666, eos_token_id=151643),
}


def tiny_shape(family: str) -> dict:
    return dict(REAL_SHAPES[family], vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                num_kv_heads=4 if family == "llada" else 2, intermediate_size=128,
                mask_token_id=500, eos_token_id=501)


@dataclass
class Row:
    family: str
    variant: str              # "eager ops" or "compiled ops" (EngineConfig.compile_layer_ops)
    batch: int
    kind: str                 # all / plain / commit / admission
    steps: int
    step_ms: float            # median
    floor_ms: float           # median over the same steps
    ratio_to_floor: float
    tokens_per_s: float       # generated tokens per second of the whole loop (kind "all")
    host_ms: float            # median step time not spent waiting for the device
    syncs_per_step: float
    launches_per_step: float
    tokens_per_pass: float    # packed query tokens
    graph_fraction: float     # steps replayed from CUDA graphs


def build_engine(family: str, shape: dict, device: str, dtype: torch.dtype, batch: int,
                 prompt_len: int, new_tokens: int, backend: str, graphs: bool,
                 workdir: Path) -> LLMEngine:
    write_byte_tokenizer(workdir)
    tokenizer = Tokenizer.from_pretrained(workdir)
    config = ModelConfig(family=family, max_position_embeddings=prompt_len + new_tokens + 64,
                         **shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DiffusionLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    kv_tokens = batch * (prompt_len + new_tokens + 64)
    engine_config = EngineConfig(max_num_seqs=batch, kv_cache_tokens=kv_tokens,
                                 max_queue=1 << 20, attention_backend=backend, cuda_graphs=graphs,
                                 threshold=0.9)
    return LLMEngine(model, tokenizer, engine_config)


def measure_copy_bandwidth(device: str, dtype: torch.dtype, nbytes: int, sync) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    src = torch.empty(n, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def measure_matmul_rate(device: str, dtype: torch.dtype, size: int, sync) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)


def weight_bytes(model: DiffusionLM) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def linear_params_per_token(config: ModelConfig) -> int:
    d, kv = config.hidden_size, config.num_kv_heads * config.head_dim
    attention = d * d * 2 + d * kv * 2
    mlp = 3 * d * config.intermediate_size
    return config.num_layers * (attention + mlp)


def step_flops(config: ModelConfig, tokens: int, attended_pairs: int, rows: int,
               block: int) -> float:
    linear = 2 * tokens * linear_params_per_token(config)
    attention = 4 * attended_pairs * config.num_heads * config.head_dim * config.num_layers
    head = 2 * rows * block * config.hidden_size * config.vocab_size
    return float(linear + attention + head)


@contextlib.contextmanager
def count_syncs(enabled: bool):
    """Count the synchronising CUDA calls torch reports (sync debug mode 'warn')."""
    counter = {"n": 0}
    if not enabled:
        yield counter
        return
    torch.cuda.set_sync_debug_mode(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield counter
        counter["n"] = sum("synchroniz" in str(w.message) for w in caught)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def count_launches(engine: LLMEngine, steps: int, cuda: bool) -> float:
    """Host-side kernel and graph launches per engine step, from the profiler."""
    if not cuda or not engine.has_unfinished_requests():
        return 0.0
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        done = 0
        while done < steps and engine.has_unfinished_requests():
            engine.step()
            done += 1
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
             "cudaGraphLaunch")
    launches = sum(e.count for e in prof.key_averages() if e.key in names)
    return launches / max(1, done)


def run_batch(engine: LLMEngine, family: str, variant: str, batch: int, prompt_len: int,
              new_tokens: int, tokens_per_step: int, total_requests: int, sync, cuda: bool,
              floor_of) -> list[Row]:
    vocab = engine.model_config.vocab_size
    special = {engine.model_config.mask_token_id, engine.model_config.eos_token_id}
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                            tokens_per_step=tokens_per_step)

    def prompt() -> list[int]:
        ids = torch.randint(0, vocab, (prompt_len,), generator=gen).tolist()
        return [t if t not in special else 0 for t in ids]

    submitted = finished = 0
    per_step: list[dict] = []
    generated = 0
    # Warm-up request (kernel compilation, graph capture of the first buckets), not measured.
    engine.add_request("warm", prompt(), SamplingParams(max_tokens=64, temperature=0.0,
                                                        ignore_eos=True, tokens_per_step=8))
    while engine.has_unfinished_requests():
        engine.step()
    loop_start = time.perf_counter()
    with count_syncs(cuda) as syncs:
        while finished < total_requests:
            # Stagger: at most one admission per step until the batch is full.
            if submitted < total_requests and engine.stats.num_running + engine.stats.num_waiting < batch:
                engine.add_request(f"r{submitted}", prompt(), params)
                submitted += 1
            sync()
            start = time.perf_counter()
            outputs = engine.step()
            sync()
            elapsed = time.perf_counter() - start
            stats = engine.runner.last_pass
            kind = "admission" if stats.has_admission else "commit" if stats.has_commit else "plain"
            per_step.append(dict(kind=kind, s=elapsed, host=elapsed - stats.wait_s,
                                 tokens=stats.tokens, graph=stats.graph,
                                 floor=floor_of(stats)))
            for out in outputs:
                if out.finished:
                    finished += 1
                    generated += len(out.token_ids)
    loop_s = time.perf_counter() - loop_start
    steps = len(per_step)
    sync_rate = syncs["n"] / steps if cuda else 0.0
    # Launch counts under the profiler, on a fresh short run (the profiler perturbs timing).
    for i in range(min(batch, 4)):
        engine.add_request(f"p{i}", prompt(), params)
    launches = count_launches(engine, 12, cuda)
    while engine.has_unfinished_requests():
        engine.step()

    rows = []
    for kind in ("all", "plain", "commit", "admission"):
        picked = [s for s in per_step if kind == "all" or s["kind"] == kind]
        if not picked:
            continue
        step_ms = statistics.median(s["s"] for s in picked) * 1e3
        floor_ms = statistics.median(s["floor"] for s in picked) * 1e3
        rows.append(Row(
            family=family, variant=variant, batch=batch, kind=kind, steps=len(picked), step_ms=step_ms,
            floor_ms=floor_ms, ratio_to_floor=step_ms / floor_ms if floor_ms else float("nan"),
            tokens_per_s=generated / loop_s if kind == "all" else float("nan"),
            host_ms=statistics.median(s["host"] for s in picked) * 1e3,
            syncs_per_step=sync_rate, launches_per_step=launches if kind == "all" else float("nan"),
            tokens_per_pass=statistics.mean(s["tokens"] for s in picked),
            graph_fraction=sum(s["graph"] for s in picked) / len(picked)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--families", default="dream,llada")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--tokens-per-step", type=int, default=8,
                   help="forced schedule; 8 is about the bundled student's tokens per step")
    p.add_argument("--requests-per-batch", type=float, default=2.0,
                   help="requests completed per measured batch size, in multiples of the batch")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--compiled-batches", default="1",
                   help="also measure these batches with torch.compile'd layer ops ('' = none)")
    p.add_argument("--out", type=Path, help="JSON results")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.tiny:
        if args.compiled_batches == p.get_default("compiled_batches"):
            args.compiled_batches = ""      # compiling on a CPU takes minutes
        args.prompt_len, args.new_tokens = min(args.prompt_len, 48), min(args.new_tokens, 64)
        if args.batches == p.get_default("batches"):
            args.batches = "1,4"
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    bandwidth = measure_copy_bandwidth(args.device, dtype, (1 << 31) if cuda else (1 << 26), sync)
    matmul = measure_matmul_rate(args.device, dtype, 8192 if cuda else 512, sync)
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu",
                     "dtype": str(dtype), "torch": torch.__version__,
                     "copy_bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": matmul,
                     "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "tokens_per_step": args.tokens_per_step, "families": {}, "rows": []}
    for family in args.families.split(","):
        shape = tiny_shape(family) if args.tiny else REAL_SHAPES[family]
        batches = [int(b) for b in args.batches.split(",")]
        with tempfile.TemporaryDirectory() as tmp:
            engine = build_engine(family, shape, args.device, dtype, max(batches),
                                  args.prompt_len, args.new_tokens, args.attention_backend,
                                  not args.no_cuda_graphs, Path(tmp))
        config = engine.model_config
        wbytes = weight_bytes(engine.model)

        def floor_of(stats, config=config, wbytes=wbytes) -> float:
            flops = step_flops(config, stats.tokens, stats.attended_pairs, stats.rows,
                               engine.block_size)
            return max(wbytes / bandwidth, flops / matmul)

        results["families"][family] = {
            "weight_bytes": wbytes,
            "kv_bytes_per_request": KVCachePool.bytes_per_token(config, dtype)
            * (args.prompt_len + args.new_tokens),
            "attention": engine.runner.attention_backend,
            "cuda_graphs": engine.runner.graphs is not None,
        }
        compiled = [int(b) for b in args.compiled_batches.split(",") if b]
        runs = [("eager ops", b) for b in batches] + [("compiled ops", b) for b in compiled]
        for variant, batch in runs:
            if variant == "compiled ops":
                engine.model.compile_layer_ops()
            total = max(batch, int(batch * args.requests_per_batch))
            rows = run_batch(engine, family, variant, batch, args.prompt_len, args.new_tokens,
                             args.tokens_per_step, total, sync, cuda, floor_of)
            results["rows"].extend(asdict(r) for r in rows)
            if engine.runner.graphs is not None:
                results["families"][family]["graphs_captured"] = engine.runner.graphs.num_graphs
                results["families"][family]["graphs_enabled"] = engine.runner.graphs.enabled
        del engine
        if cuda:
            torch.cuda.empty_cache()
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


def print_table(results: dict) -> None:
    print(f"device={results['device']} dtype={results['dtype']} torch={results['torch']} "
          f"prompt={results['prompt_len']} new={results['new_tokens']} "
          f"tokens/step={results['tokens_per_step']}")
    print(f"measured: copy {results['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, matmul "
          f"{results['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s")
    for family, info in results["families"].items():
        print(f"{family}: weights {info['weight_bytes'] / 1e9:.2f} GB, KV/request "
              f"{info['kv_bytes_per_request'] / 1e6:.1f} MB, attention={info['attention']}, "
              f"cuda_graphs={info['cuda_graphs']}"
              + (f" (captured {info.get('graphs_captured')}, enabled {info.get('graphs_enabled')})"
                 if info["cuda_graphs"] else ""))
    columns = ["family", "ops", "batch", "kind", "steps", "step ms", "floor ms", "step/floor", "tok/s",
               "host ms", "syncs/step", "launches/step", "tokens/pass", "graphs"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))

    def num(value: float, digits: int) -> str:
        return "" if value != value else f"{value:.{digits}f}"   # NaN: not measured

    for r in results["rows"]:
        cells = [r["family"], r["variant"], str(r["batch"]), r["kind"], str(r["steps"]), num(r["step_ms"], 2),
                 num(r["floor_ms"], 2), num(r["ratio_to_floor"], 2), num(r["tokens_per_s"], 0),
                 num(r["host_ms"], 2), num(r["syncs_per_step"], 2),
                 num(r["launches_per_step"], 0), num(r["tokens_per_pass"], 0),
                 num(r["graph_fraction"], 2)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
