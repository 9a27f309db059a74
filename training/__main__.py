"""`python -m training <stage> ...`: the CDLM training pipeline (see docs/training.md)."""

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
    from training.world.build import build_world_data
    paths = build_world_data(Path(args.out), args.train_per_family, args.test_per_family, args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_teacher(args: argparse.Namespace) -> None:
    from training.evaluate_quick import probe
    from training.teacher import TeacherConfig, train_teacher
    from training.world.build import data_path
    from training.world.tasks import FAMILIES
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
    from training.collect import CollectConfig, collect
    cfg = _dataclass_from_args(CollectConfig, args)
    index = collect(Path(args.model), [Path(p) for p in args.prompts], Path(args.out), cfg)
    print(f"{len(index['shards'])}/{index['num_chunks']} shards, complete={index['complete']}")


def cmd_distill(args: argparse.Namespace) -> None:
    from training.distill import DistillConfig, distill
    cfg = _dataclass_from_args(DistillConfig, args)
    print(distill(Path(args.base), Path(args.trajectories), Path(args.out), cfg))


def cmd_eval(args: argparse.Namespace) -> None:
    from training.evaluate import EvalConfig, evaluate
    cfg = _dataclass_from_args(EvalConfig, args)
    tests = dict(spec.split("=", 1) for spec in args.tests)
    report = evaluate(Path(args.teacher), Path(args.student),
                      {k: Path(v) for k, v in tests.items()}, Path(args.out), cfg)
    from training.evaluate import markdown_table
    print(markdown_table(report))


def cmd_choose_threshold(args: argparse.Namespace) -> None:
    from training.evaluate_threshold import ChoiceConfig, choose_threshold
    cfg = _dataclass_from_args(ChoiceConfig, args)
    vals = dict(spec.split("=", 1) for spec in args.val)
    print(choose_threshold(Path(args.teacher), Path(args.student),
                           {k: Path(v) for k, v in vals.items()}, Path(args.out), cfg))


def cmd_world(args: argparse.Namespace) -> None:
    from training.world.pipeline import WorldConfig, run_world
    run_world(Path(args.out), WorldConfig.preset(args.preset))


def cmd_export_default(args: argparse.Namespace) -> None:
    from training.export import export_default
    root = Path(args.world)
    print(export_default(root / "teacher" / "model", root / "student" / "adapter",
                         table=root / "eval" / "table.json"))


def build_parser() -> argparse.ArgumentParser:
    from training.collect import CollectConfig
    from training.distill import DistillConfig
    from training.evaluate import EvalConfig
    from training.evaluate_threshold import ChoiceConfig
    from training.teacher import TeacherConfig

    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--prompts", required=True, nargs="+", help="JSONL files: prompt, answer")
    p.add_argument("--out", required=True)
    _add_dataclass_args(p, CollectConfig)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("distill", help="train the block-causal LoRA student")
    p.add_argument("--base", required=True, help="teacher checkpoint directory")
    p.add_argument("--trajectories", required=True)
    p.add_argument("--out", required=True)
    _add_dataclass_args(p, DistillConfig)
    p.set_defaults(func=cmd_distill)

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
    p.add_argument("--preset", default="full", choices=("full", "micro"))
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("export-default", help="copy a world's teacher + student into "
                       "cdlm/assets/default (the bundled model)")
    p.add_argument("--world", default="runs/world")
    p.set_defaults(func=cmd_export_default)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
