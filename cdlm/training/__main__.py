"""`python -m cdlm.training <stage> ...`: the CDLM training pipeline (see docs/training.md)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def _add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    """Every field of a config dataclass becomes a --flag with its default."""
    for f in dataclasses.fields(cls):
        default = f.default
        kind = type(default) if default is not None else str
        if kind is bool:
            parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", type=lambda s: s.lower()
                                in ("1", "true", "yes"), default=default)
        elif kind in (int, float, str):
            parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", type=kind, default=default)
        elif kind is tuple:  # a comma list of numbers, e.g. --student-sweep 0.9,0.95
            parser.add_argument(f"--{prefix}{f.name.replace('_', '-')}", default=default,
                                type=lambda s: tuple(float(x) for x in s.split(",") if x))


def _dataclass_from_args(cls, args: argparse.Namespace, prefix: str = ""):
    values = {}
    for f in dataclasses.fields(cls):
        key = (prefix + f.name).replace("-", "_")
        if hasattr(args, key):
            values[f.name] = getattr(args, key)
    return cls(**values)


def cmd_world_data(args: argparse.Namespace) -> None:
    from cdlm.training.world.build import build_world_data
    paths = build_world_data(Path(args.out), args.train_per_family, args.test_per_family, args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_teacher(args: argparse.Namespace) -> None:
    from cdlm.training.evaluate_quick import probe
    from cdlm.training.teacher import TeacherConfig, train_teacher
    from cdlm.training.world.build import data_path
    from cdlm.training.world.tasks import FAMILIES
    from cdlm.tokenizer import Tokenizer

    root = Path(args.world)
    cfg = _dataclass_from_args(TeacherConfig, args)
    tokenizer = Tokenizer.from_pretrained(root / "tokenizer")
    eval_fn = None
    if args.eval_every:
        # Probed on validation (never test): the naive policy and the training-free threshold rule.
        eval_fn = probe({f: data_path(root, f, "val") for f in FAMILIES}, tokenizer,
                        args.eval_n, cfg.gen_len, cfg.block_size, ks=(1,), thresholds=(0.9,))
    out = train_teacher([data_path(root, f, "train") for f in FAMILIES], root / "tokenizer",
                        Path(args.out), cfg, eval_fn, args.eval_every)
    print(out)


def cmd_collect(args: argparse.Namespace) -> None:
    from cdlm.training.collect import CollectConfig, collect
    cfg = _dataclass_from_args(CollectConfig, args)
    if args.dry_run:
        print(collect_dry_run(args, cfg))
        return
    index = collect(Path(args.model), list(args.prompts), Path(args.out), cfg)
    print(f"{len(index['shards'])}/{index['num_chunks']} shards, complete={index['complete']}, "
          f"{index['num_prompts']} prompts ({index.get('skipped_long_prompts', 0)} skipped as "
          f"longer than {cfg.max_prompt_tokens} tokens)")


def cmd_distill(args: argparse.Namespace) -> None:
    from cdlm.training.distill import DistillConfig, distill
    cfg = _dataclass_from_args(DistillConfig, args)
    if args.dry_run:
        print(distill_dry_run(args, cfg))
        return
    print(distill(Path(args.base), Path(args.trajectories), Path(args.out), cfg))


def _model_config(name: str):
    """config.json of a local checkpoint directory, or of a hub id (only that file is fetched)."""
    from cdlm.config import ModelConfig
    from cdlm.models.layouts import config_from_dict
    import json
    local = Path(name).expanduser()
    if local.is_dir():
        return ModelConfig.from_pretrained(str(local))
    from huggingface_hub import hf_hub_download
    return config_from_dict(json.loads(Path(hf_hub_download(name, "config.json")).read_text()))


def _processes(args: argparse.Namespace) -> int:
    import os
    return args.processes or int(os.environ.get("WORLD_SIZE", "1"))


def distill_dry_run(args: argparse.Namespace, cfg) -> str:
    from cdlm.training.distill import base_dtype
    from cdlm.training.dry_run import format_distill_plan, plan_distill
    from cdlm.training.trajectories import INDEX, read_index
    config = _model_config(args.base)
    traj = Path(args.trajectories)
    gen_len, block_size, count = args.gen_len, config.block_size, args.assume_trajectories
    prompt_tokens, shard_bytes = args.prompt_tokens, 0
    if (traj / INDEX).exists():
        index = read_index(traj)
        gen_len, block_size = int(index["gen_len"]), int(index["block_size"])
        count = int(index["num_prompts"])
        prompt_tokens = int(index.get("max_prompt_tokens") or prompt_tokens)
        shard_bytes = max(((traj / n).stat().st_size for n in index["shards"]), default=0)
    if not shard_bytes:
        from cdlm.training.collect import CollectConfig, record_bytes
        ccfg = CollectConfig(gen_len=gen_len, block_size=block_size)
        shard_bytes = ccfg.chunk_size * record_bytes(ccfg, config.hidden_size, prompt_tokens)
    dtype = base_dtype(cfg, "cuda" if not cfg.device or cfg.device.startswith("cuda")
                       else cfg.device)
    plan = plan_distill(config, cfg, _processes(args), count, gen_len, block_size,
                        prompt_tokens, shard_bytes, dtype)
    return format_distill_plan(plan, args.gpu_gib)


def collect_dry_run(args: argparse.Namespace, cfg) -> str:
    from cdlm.models.loader import resolve_model_path
    from cdlm.tokenizer import Tokenizer
    from cdlm.training.collect import prepare_prompts
    from cdlm.training.dry_run import format_collect_plan, plan_collect
    config = _model_config(args.model)
    local = Path(args.model).expanduser()
    tokenizer = Tokenizer.from_pretrained(local if local.is_dir() else
                                          resolve_model_path(args.model))
    prompts = prepare_prompts(list(args.prompts), tokenizer, cfg)
    if not prompts.rows:
        raise SystemExit("no prompts left after the prompt-length filter")
    dtype = cfg.dtype if cfg.dtype != "auto" else "bfloat16"
    plan = plan_collect(config, cfg, [len(p) for p in prompts.prompt_ids],
                        prompts.skipped_long, _processes(args), dtype)
    return format_collect_plan(plan)


def cmd_eval(args: argparse.Namespace) -> None:
    from cdlm.training.evaluate import EvalConfig, evaluate
    cfg = _dataclass_from_args(EvalConfig, args)
    tests = dict(spec.split("=", 1) for spec in args.tests)
    report = evaluate(Path(args.teacher), Path(args.student),
                      {k: Path(v) for k, v in tests.items()}, Path(args.out), cfg)
    from cdlm.training.evaluate import markdown_table
    print(markdown_table(report))


def cmd_choose_threshold(args: argparse.Namespace) -> None:
    from cdlm.training.evaluate_threshold import ChoiceConfig, choose_threshold
    cfg = _dataclass_from_args(ChoiceConfig, args)
    vals = dict(spec.split("=", 1) for spec in args.val)
    print(choose_threshold(Path(args.teacher), Path(args.student),
                           {k: Path(v) for k, v in vals.items()}, Path(args.out), cfg))


def cmd_world(args: argparse.Namespace) -> None:
    from cdlm.training.world.pipeline import WorldConfig, run_world
    run_world(Path(args.out), WorldConfig.preset(args.world_size))


def cmd_export_default(args: argparse.Namespace) -> None:
    from cdlm.training.export import export_default
    root = Path(args.world)
    print(export_default(root / "teacher" / "model", root / "student" / "adapter",
                         table=root / "eval" / "table.json"))


def build_parser() -> argparse.ArgumentParser:
    from cdlm.training.collect import CollectConfig
    from cdlm.training.distill import DistillConfig
    from cdlm.training.evaluate import EvalConfig
    from cdlm.training.evaluate_threshold import ChoiceConfig
    from cdlm.training.teacher import TeacherConfig

    parser = argparse.ArgumentParser(prog="python -m cdlm.training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    stages: dict[str, argparse.ArgumentParser] = {}
    parser.set_defaults(stage_parsers=stages)

    p = sub.add_parser("world-data", help="tokenizer + synthetic task JSONL (small world)")
    p.add_argument("--out", required=True)
    p.add_argument("--train-per-family", type=int, default=20000)
    p.add_argument("--test-per-family", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_world_data)

    p = sub.add_parser("teacher", help="train the small world's teacher from scratch")
    p.add_argument("--world", required=True, help="directory written by world-data")
    p.add_argument("--out", required=True)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=32)
    _add_dataclass_args(p, TeacherConfig)
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("collect", help="naive-policy teacher trajectories (multi-process: "
                       "launch with torchrun / accelerate launch)")
    p.add_argument("--model", required=True, help="teacher checkpoint directory or hub id")
    p.add_argument("--prompts", required=True, nargs="+",
                   help="prompt sources: JSONL / parquet files, a `datasets` directory "
                   "(save_to_disk, or a downloaded dataset repo), or a hub dataset id; map "
                   "columns with --prompt-field/--answer-field or --messages-field")
    p.add_argument("--out", required=True)
    _add_preset_and_dry_run(p)
    _add_dataclass_args(p, CollectConfig)
    p.set_defaults(func=cmd_collect)
    stages["collect"] = p

    p = sub.add_parser("distill", help="train the block-causal LoRA student (multi-process: "
                       "torchrun / accelerate launch; --batch-size is the global batch)")
    p.add_argument("--base", required=True, help="teacher checkpoint directory or hub id")
    p.add_argument("--trajectories", required=True)
    p.add_argument("--out", required=True)
    _add_preset_and_dry_run(p)
    p.add_argument("--assume-trajectories", type=int, default=7500,
                   help="dry run without a collection: trajectories to plan for")
    p.add_argument("--gen-len", type=int, default=256,
                   help="dry run without a collection: generation length")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="dry run: memory per GPU")
    _add_dataclass_args(p, DistillConfig)
    p.set_defaults(func=cmd_distill)
    stages["distill"] = p

    p = sub.add_parser("eval", help="the paper's table through cdlm.LLM")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True, help="LoRA adapter directory")
    p.add_argument("--tests", required=True, nargs="+", help="family=path.jsonl ...")
    p.add_argument("--out", required=True)
    _add_dataclass_args(p, EvalConfig)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("choose-threshold", help="the student's threshold, chosen on a "
                       "validation split (never the test split)")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True, help="LoRA adapter directory")
    p.add_argument("--val", required=True, nargs="+", help="family=path.jsonl ...")
    p.add_argument("--out", required=True, help="JSON file: measurements and the choice")
    _add_dataclass_args(p, ChoiceConfig)
    p.set_defaults(func=cmd_choose_threshold)

    p = sub.add_parser("world", help="regenerate the whole small world, every stage resumable")
    p.add_argument("--out", default="runs/world")
    # A world size, not a real family's recipe: its own attribute, so `args.preset` only ever
    # names a recipe preset.
    p.add_argument("--preset", dest="world_size", default="full", choices=("full", "micro"))
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("export-default", help="copy a world's teacher + student into "
                       "cdlm/assets/default (the bundled model)")
    p.add_argument("--world", default="runs/world")
    p.set_defaults(func=cmd_export_default)
    return parser


def _add_preset_and_dry_run(p: argparse.ArgumentParser) -> None:
    from cdlm.training.presets import PRESETS
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="the paper's recipe for a real family (flags given here override it)")
    p.add_argument("--dry-run", action="store_true",
                   help="print memory per GPU, disk and steps for these arguments; run nothing")
    p.add_argument("--processes", type=int, default=0,
                   help="dry run: number of processes (default: WORLD_SIZE, else 1)")
    p.add_argument("--prompt-tokens", type=int, default=512,
                   help="dry run: longest prompt to plan for (a collection's own filter wins)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, with a stage's `--preset` values as the defaults of its flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        from cdlm.training.presets import preset_defaults
        args.stage_parsers[args.command].set_defaults(**preset_defaults(args.preset,
                                                                        args.command))
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    from cdlm.training.io_utils import DiskFullError
    args = parse_args(argv)
    try:
        args.func(args)
    except DiskFullError as exc:
        print(f"error: {exc.strerror}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main(sys.argv[1:])
