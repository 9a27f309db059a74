"""The paper's recipes as `--preset` defaults: the real families' values, explicit flags win."""

from __future__ import annotations

import pytest

from cdlm.training.__main__ import parse_args
from cdlm.training.collect import CollectConfig
from cdlm.training.distill import DistillConfig
from cdlm.training.__main__ import _dataclass_from_args


def _distill(*flags: str) -> DistillConfig:
    args = parse_args(["distill", "--base", "b", "--trajectories", "t", "--out", "o", *flags])
    return _dataclass_from_args(DistillConfig, args)


def _collect(*flags: str) -> CollectConfig:
    args = parse_args(["collect", "--model", "m", "--prompts", "p.jsonl", "--out", "o", *flags])
    return _dataclass_from_args(CollectConfig, args)


@pytest.mark.parametrize("preset, w_dlm", [("dream-7b", 0.01), ("llada-8b", 0.1)])
def test_presets_carry_the_papers_recipe(preset, w_dlm):
    d = _distill("--preset", preset)
    assert (d.w_distill, d.w_cons, d.w_dlm) == (1.0, 0.5, w_dlm)      # the paper's weights
    assert (d.batch_size, d.epochs) == (64, 16.0)                       # effective batch, epochs
    assert (d.lora_r, d.lora_alpha, d.lr) == (32, 32, 1e-5)
    assert d.base_dtype == "bfloat16" and d.gradient_checkpointing and d.micro_batch_size == 8
    c = _collect("--preset", preset)
    assert (c.gen_len, c.block_size, c.max_prompt_tokens) == (256, 32, 512)


def test_flags_override_a_preset_and_defaults_stay_without_one():
    d = _distill("--preset", "dream-7b", "--w-dlm", "0.5", "--micro-batch-size", "4")
    assert d.w_dlm == 0.5 and d.micro_batch_size == 4 and d.batch_size == 64
    plain = _distill()
    assert plain == DistillConfig()
    assert _collect() == CollectConfig()


def test_the_world_commands_preset_is_a_world_size_not_a_recipe():
    # `world --preset micro` once reached the recipe-preset lookup and crashed the command.
    args = parse_args(["world", "--preset", "micro", "--out", "w"])
    assert args.world_size == "micro" and getattr(args, "preset", None) is None
    assert parse_args(["world"]).world_size == "full"
