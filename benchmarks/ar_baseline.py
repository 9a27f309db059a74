"""An autoregressive model of Dream's size, decoded the fast way, as the bar to clear.

transformers' Qwen2 at Dream-7B's exact shape (Dream is a Qwen2 layout), random bf16 weights,
a static KV cache and `torch.compile` of the decoding step (transformers' own compiled
generation path), greedy, 256 new tokens after a 512-token prompt, at batch 1 and 16. Tokens per
second are generated tokens over the wall time of `generate` (prefill included, as for the
diffusion engine's figures), after a warm-up call that pays for compilation.

    python benchmarks/ar_baseline.py --out docs/bench_ar.json      # CUDA, Dream-7B shape
    python benchmarks/ar_baseline.py --device cpu --tiny           # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

DREAM_SHAPE = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                   rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)
TINY_SHAPE = dict(DREAM_SHAPE, vocab_size=512, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build(shape: dict, device: str, dtype: torch.dtype, max_len: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(max_position_embeddings=max_len, **shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def generation_kwargs(compile_step: bool, new_tokens: int) -> tuple[dict, str]:
    """Static cache, and transformers' compiled decoding step when asked and available."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
    how = "static cache, eager"
    if compile_step:
        try:
            from transformers import CompileConfig
            kwargs["compile_config"] = CompileConfig(fullgraph=True, mode="reduce-overhead")
            how = "static cache + torch.compile (reduce-overhead)"
        except ImportError:
            how = "static cache (this transformers has no CompileConfig)"
    return kwargs, how


@torch.inference_mode()
def tokens_per_second(model, batch: int, prompt_len: int, kwargs: dict, repeats: int,
                      device: str, sync) -> tuple[float, float]:
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    model.generate(ids, attention_mask=mask, **kwargs)         # warm-up: compile, cache
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kwargs)
        sync()
        times.append(time.perf_counter() - start)
    generated = (out.shape[1] - prompt_len) * batch
    seconds = statistics.median(times)
    return generated / seconds, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.tiny:
        args.prompt_len, args.new_tokens = min(args.prompt_len, 32), min(args.new_tokens, 32)
        args.batches, args.repeats = "1,4", 1
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build(TINY_SHAPE if args.tiny else DREAM_SHAPE, args.device, dtype,
                  args.prompt_len + args.new_tokens + 8)
    kwargs, how = generation_kwargs(cuda and not args.no_compile, args.new_tokens)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        try:
            rate, seconds = tokens_per_second(model, batch, args.prompt_len, kwargs,
                                              args.repeats, args.device, sync)
        except Exception as error:   # a compile failure must not hide the eager number
            if "compile_config" not in kwargs:
                raise
            print(f"compiled generation failed ({error!r}); falling back to eager", file=sys.stderr)
            kwargs.pop("compile_config")
            how = "static cache, eager (compile failed)"
            rate, seconds = tokens_per_second(model, batch, args.prompt_len, kwargs,
                                              args.repeats, args.device, sync)
        rows.append({"batch": batch, "tokens_per_s": rate, "seconds": seconds})
    import transformers
    result = {"model": "Qwen2 at Dream-7B shape" if not args.tiny else "tiny Qwen2",
              "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype),
              "how": how, "transformers": transformers.__version__, "torch": torch.__version__,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows}
    print(f"{result['model']} on {result['device']} ({result['dtype']}), {how}; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    print("| batch | tokens/s | seconds per generate |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['batch']} | {row['tokens_per_s']:.1f} | {row['seconds']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
