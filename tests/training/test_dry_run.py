"""Memory options and `--dry-run`: gradient checkpointing gives the same gradients, the traced
activation memory is what a real step keeps, and the dry run on the real families' shapes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from launch import run
from real_configs import write_real_config
from cdlm.training.distill import DistillConfig, make_student, student_losses, _base
from cdlm.training.dry_run import SavedTensorCounter, StudentShape, meta_student, trace_student_step
from cdlm.training.student_batch import BlockExample, DLMNoise, LossNorm


def fixed_examples(config, shape: StudentShape, block_size: int, seed: int = 0
                   ) -> list[BlockExample]:
    """Rows of exactly `shape`: prompt, then one block whose positions are half newly
    unmasked, half still masked; a reference answer filling the DLM row."""
    gen = torch.Generator().manual_seed(seed)
    prompt_len = shape.y_len - block_size
    out = []
    for _ in range(shape.rows):
        y = torch.randint(4, config.vocab_size, (shape.y_len,), generator=gen)
        newly = torch.zeros(shape.y_len, dtype=torch.bool)
        still = torch.zeros(shape.y_len, dtype=torch.bool)
        newly[prompt_len:prompt_len + block_size // 2] = True
        still[prompt_len + block_size // 2:] = True
        y_star = y.clone()
        y[prompt_len:] = config.mask_token_id
        y_star[prompt_len + block_size // 2:] = config.mask_token_id
        out.append(BlockExample(
            y=y, y_star=y_star, prompt_len=prompt_len, newly=newly, still=still,
            teacher_hidden=torch.randn(block_size // 2, config.hidden_size, generator=gen),
            answer_ids=torch.randint(4, config.vocab_size, (shape.dlm_len - prompt_len,),
                                     generator=gen)))
    return out


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_traced_activation_memory_is_what_a_real_step_saves(family, tiny_llada, tiny_dream):
    path = (tiny_llada if family == "llada" else tiny_dream)[0]
    cfg = DistillConfig(lora_r=4, lora_alpha=8, w_dlm=1.0)
    student = make_student(path, cfg)
    config = _base(student).config
    block = config.block_size
    shape = StudentShape(rows=2, y_len=3 * block, positions=block, dlm_len=3 * block)
    examples = fixed_examples(config, shape, block)
    noise = DLMNoise(t=torch.ones(shape.rows), u=torch.zeros(shape.rows, shape.dlm_len))
    counter = SavedTensorCounter(student)
    with counter.hooks():
        student_losses(student, examples, block, cfg, norm=LossNorm.of(examples),
                       dlm_noise=noise)
    real = counter.total
    traced = trace_student_step(meta_student(config, 4, 8, "float32", False), shape, block,
                                w_dlm=True)
    # Equal but for a few index tensors of advanced indexing (bytes, not activations).
    assert real > 0 and abs(traced - real) / real < 0.01, (traced, real)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dream):
    path = tiny_dream[0]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = DistillConfig(lora_r=4, lora_alpha=8, w_dlm=1.0,
                            gradient_checkpointing=checkpointing)
        student = make_student(path, cfg)
        for name, p in student.named_parameters():     # non-zero B: every LoRA grad matters
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        config = _base(student).config
        shape = StudentShape(rows=2, y_len=40, positions=config.block_size, dlm_len=40)
        examples = fixed_examples(config, shape, config.block_size)
        noise = DLMNoise.draw(examples, torch.Generator().manual_seed(1))
        student_losses(student, examples, config.block_size, cfg, dlm_noise=noise)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()
                      if p.requires_grad})
        assert _base(student).gradient_checkpointing is checkpointing
    plain, recomputed = grads
    assert all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        assert torch.allclose(plain[name], recomputed[name], rtol=1e-5, atol=1e-7), name


def _dry_run(tmp_path: Path, capsys, name: str, *flags: str) -> str:
    from cdlm.training.__main__ import main
    base = write_real_config(tmp_path / name, name)
    main(["distill", "--base", str(base), "--trajectories", str(tmp_path / "none"),
          "--out", str(tmp_path / "out"), "--dry-run", "--processes", "4", *flags])
    return capsys.readouterr().out


def test_dry_run_on_the_real_family_shapes(tmp_path, capsys):
    dream = _dry_run(tmp_path, capsys, "dream-7b", "--preset", "dream-7b")
    assert "dream, 28 layers, 7.62B frozen parameters, LoRA 80.7M" in dream
    assert "optimizer steps: 1875 (7500 trajectories)" in dream      # 16 epochs x 7.5k / 64
    assert "16 rows per rank, micro-batch 8 (2 forward/backward" in dream
    assert "of 80 GiB: fits" in dream
    llada = _dry_run(tmp_path, capsys, "llada-8b", "--preset", "llada-8b", "--assume-trajectories",
                     "15000", "--micro-batch-size", "16", "--gradient-checkpointing", "false")
    assert "llada, 32 layers, 8.02B frozen parameters, LoRA 83.9M" in llada
    assert "optimizer steps: 3750 (15000 trajectories)" in llada
    assert "does NOT fit" in llada
    assert not (tmp_path / "out").exists()                           # nothing ran


def test_dry_run_reads_an_existing_collection(micro_world, tmp_path):
    root, _ = micro_world
    out = run(["distill", "--base", str(root / "teacher" / "model"), "--trajectories",
               str(root / "trajectories"), "--out", str(tmp_path / "s"), "--dry-run",
               "--epochs", "2", "--batch-size", "4"]).stdout      # the CLI, for real
    index = json.loads((root / "trajectories" / "index.json").read_text())
    assert f"optimizer steps: {2 * index['num_prompts'] // 4} ({index['num_prompts']} " \
        "trajectories)" in out
    assert not (tmp_path / "s").exists()


def test_collect_dry_run_disk_estimate_bounds_the_real_collection(micro_world, tmp_path):
    from cdlm.models.loader import load_config
    from cdlm.tokenizer import Tokenizer
    from cdlm.training.collect import CollectConfig, collect, prepare_prompts
    from cdlm.training.dry_run import plan_collect
    from cdlm.training.world.pipeline import collect_prompts
    root, _ = micro_world
    teacher, prompts = root / "teacher" / "model", collect_prompts(root, 4)
    printed = run(["collect", "--model", str(teacher), "--prompts", str(prompts), "--out",
                   str(tmp_path / "traj"), "--chunk-size", "4", "--dry-run"]).stdout
    assert "8 prompts (0 skipped" in printed and "2 shards of up to 4" in printed
    assert not (tmp_path / "traj").exists()                          # nothing ran
    cfg = CollectConfig(chunk_size=4, batch_size=4)
    ready = prepare_prompts([prompts], Tokenizer.from_pretrained(teacher), cfg)
    plan = plan_collect(load_config(teacher), cfg, [len(p) for p in ready.prompt_ids], 0, 1,
                        "float32")
    collect(teacher, [prompts], tmp_path / "traj", cfg)
    shards = list((tmp_path / "traj").glob("shard-*"))
    real = sum(p.stat().st_size for p in shards)
    # Tensor bytes (an upper bound on them); a shard adds its JSON header of metadata.
    assert 0.5 * real < plan.disk_bytes < 1.2 * real, (plan.disk_bytes, real)
    assert len(shards) == plan.shards


def test_bf16_base_keeps_fp32_lora_and_trains(micro_world, tmp_path):
    from cdlm.training.distill import distill
    from launch import adapter, log_rows
    root, _ = micro_world
    cfg = DistillConfig(lora_r=4, lora_alpha=8, steps=3, batch_size=4, log_every=1,
                        base_dtype="bfloat16", gradient_checkpointing=True, device="cpu")
    student = make_student(root / "teacher" / "model", cfg)
    assert {p.dtype for p in student.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in student.parameters() if p.requires_grad} == {torch.float32}
    out = tmp_path / "student"
    distill(root / "teacher" / "model", root / "trajectories", out, cfg)
    rows = log_rows(out)
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert all(t.dtype == torch.float32 for t in adapter(out).values())
