"""The `cdlm` command: `cdlm generate ...`, `cdlm serve ...`."""

from __future__ import annotations

import argparse
import sys
import time


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="decode one prompt and print it with its cost")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="model directory or hub id (default: bundled)")
    p.add_argument("--lora", default=None, help="peft LoRA adapter directory")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threshold", type=float, default=None,
                   help="confidence threshold (default: the checkpoint's generation_config.json, "
                        "else 0.9)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="block-causal reference path: recompute everything every step")
    p.add_argument("--mode", choices=["cdlm", "reference", "bidirectional"], default=None,
                   help="decoding mode (bidirectional = the teacher baselines)")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="finalise exactly this many tokens per step (1 = naive)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)


def _generate(args: argparse.Namespace) -> int:
    from cdlm import LLM, SamplingParams

    llm = LLM(args.model, args.lora, threshold=args.threshold, dtype=args.dtype,
              device=args.device, use_kv_cache=not args.no_kv_cache)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, stop=args.stop,
                            tokens_per_step=args.tokens_per_step)
    prompt: str | list[int] = args.prompt
    if args.chat:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    mode = args.mode or ("reference" if args.no_kv_cache else "cdlm")
    started = time.perf_counter()
    out = llm.generate(prompt, params, mode=mode)[0]
    elapsed = time.perf_counter() - started
    n = len(out.token_ids)
    print(out.text)
    print(f"--- mode={mode} tokens={n} steps={out.steps} tokens/step={n / max(out.steps, 1):.2f} "
          f"latency={elapsed:.3f}s tokens/s={n / elapsed:.1f} finish_reason={out.finish_reason}",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    from cdlm.server.cli import add_serve_arguments
    add_serve_arguments(sub.add_parser("serve", help="start the OpenAI-compatible HTTP server"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    if args.command == "serve":
        from cdlm.server.cli import exit_process, run_serve
        exit_process(run_serve(args))   # no interpreter teardown: exits promptly on SIGTERM
    return 2


if __name__ == "__main__":
    sys.exit(main())
