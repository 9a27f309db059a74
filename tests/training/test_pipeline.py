"""Every stage on the micro configuration, for real: resume, multi-process split, adapters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cdlm import LLM, SamplingParams
from cdlm.models.loader import load_model
from cdlm.training.collect import CollectConfig, collect
from cdlm.training.distill import DistillConfig, distill, make_student, save_adapter
from cdlm.training.trajectories import iter_trajectories, read_index, shard_name
from cdlm.training.export import export_default
from cdlm.training.world.pipeline import collect_prompts


def test_micro_world_runs_every_stage(micro_world):
    root, report = micro_world
    assert (root / "teacher" / "model" / "config.json").exists()
    config = json.loads((root / "teacher" / "model" / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    assert read_index(root / "trajectories")["complete"]
    assert (root / "student" / "adapter" / "adapter_model.safetensors").exists()
    # The student's threshold was chosen on validation, from the preset's candidates.
    choice = json.loads((root / "eval" / "threshold.json").read_text())
    assert choice["split"] == "val" and choice["threshold"] in (0.5, 0.9)
    assert report["config"]["threshold"] == choice["threshold"]
    other = 0.9 if choice["threshold"] == 0.5 else 0.5
    for family in ("math", "code"):
        rows = report["results"][family]
        k = rows["budget_k"]
        assert {"naive teacher", "naive teacher, whole window", "teacher + threshold 0.9",
                f"teacher + threshold {choice['threshold']:g}",
                f"teacher @ student budget (k={k})", "CDLM student",
                f"CDLM student @ threshold {other:g}"} <= set(rows)
        assert rows["naive teacher"]["n"] == 2
        # The paper's baseline decodes every position of the window, one per step.
        window = report["config"]["gen_len"]
        assert rows["naive teacher, whole window"]["mean_steps"] == window
        assert rows["naive teacher"]["mean_steps"] <= window
    table = (root / "eval" / "table.md").read_text()
    assert table.startswith("| family |") and "whole window" in table
    log = [json.loads(l) for l in (root / "student" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all({"loss", "distill", "cons", "dlm"} <= set(r) for r in log)


def test_trajectories_record_the_naive_policy(micro_world):
    root, _ = micro_world
    model = load_model(root / "teacher" / "model")
    for traj in iter_trajectories(root / "trajectories"):
        decided = traj.steps >= 0
        steps = traj.steps[decided]
        # One token per step: the finalisation steps are 0..n-1, each used once.
        assert sorted(steps.tolist()) == list(range(int(decided.sum())))
        assert traj.meta["num_steps"] == int(decided.sum())
        # Teacher logits rebuilt from the stored hidden state pick the stored token.
        rebuilt = model.logits(traj.hidden[decided].float()).argmax(-1)
        assert (rebuilt == traj.tokens[decided]).float().mean() > 0.9  # fp16 storage
        assert traj.answer_ids.shape[0] == 64


def test_collect_resumes_and_splits_across_ranks(micro_world, tmp_path, monkeypatch):
    root, _ = micro_world
    prompts = collect_prompts(root, 4)
    teacher = root / "teacher" / "model"
    cfg = CollectConfig(batch_size=4, chunk_size=2)
    out = tmp_path / "traj"
    for rank in (1, 0):   # two "processes" of a WORLD_SIZE=2 launch
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        index = collect(teacher, [prompts], out, cfg)
    assert index["complete"] and index["num_chunks"] == 4
    first = [t.tokens for t in iter_trajectories(out)]
    # Kill-and-resume: a missing shard is recomputed, existing ones are not touched.
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    kept = out / shard_name(0)
    mtime = kept.stat().st_mtime_ns
    (out / shard_name(2)).unlink()
    assert collect(teacher, [prompts], out, cfg)["complete"]
    assert kept.stat().st_mtime_ns == mtime
    assert read_index(out)["complete"]
    assert all(torch.equal(a, b) for a, b in zip(first, (t.tokens for t in iter_trajectories(out))))


def test_distill_resumes_from_its_checkpoint(micro_world, tmp_path):
    root, _ = micro_world
    teacher = root / "teacher" / "model"
    cfg = DistillConfig(lora_r=4, lora_alpha=8, steps=2, batch_size=2, ckpt_every=1,
                        log_every=1, warmup=1)
    out = tmp_path / "student"
    distill(teacher, root / "trajectories", out, cfg)
    state = torch.load(out / "state.pt", weights_only=False)
    assert state["step"] == 2
    # A longer run in the same directory continues from step 2 (a finished adapter is kept,
    # so remove it as a user extending the run would).
    import shutil
    shutil.rmtree(out / "adapter")
    cfg.steps = 3
    distill(teacher, root / "trajectories", out, cfg)
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_adapter_loads_through_llm_like_the_peft_model(micro_world, tmp_path):
    root, _ = micro_world
    teacher = root / "teacher" / "model"
    # An adapter in distill's own format, with non-zero B so that the LoRA delta matters.
    student = make_student(teacher, DistillConfig(lora_r=4, lora_alpha=8))
    torch.manual_seed(0)
    for name, p in student.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    adapter = tmp_path / "adapter"
    save_adapter(student, adapter, teacher)
    ids = torch.randint(8, student.get_base_model().config.vocab_size, (2, 20))
    merged = load_model(teacher, lora=adapter)
    plain = load_model(teacher)
    with torch.no_grad():
        a, b, c = student(ids), merged(ids), plain(ids)
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(b, c, atol=1e-2)      # the adapter did change the model
    # And through the engine: LLM(model=BASE, lora=ADAPTER) equals LLM on a merged copy.
    from cdlm.models.loader import save_pretrained
    import shutil
    merged_dir = tmp_path / "merged"
    save_pretrained(merged, merged_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(teacher / f, merged_dir / f)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    prompt = "trace : a = 3 ; b = a + 4 ; print b"
    x = LLM(model=str(teacher), lora=str(adapter)).generate([prompt], params)[0]
    y = LLM(model=str(merged_dir)).generate([prompt], params)[0]
    assert x.token_ids == y.token_ids and x.steps == y.steps


def test_trajectory_pool_streams_shards(micro_world):
    root, _ = micro_world
    from cdlm.training.trajectories import TrajectoryPool
    import random
    names = read_index(root / "trajectories")["shards"]
    assert len(names) >= 2
    pool = TrajectoryPool(root / "trajectories", max_shards=1, refresh_every=3,
                          rng=random.Random(0))
    seen, rng = set(), random.Random(1)
    for _ in range(60):
        assert len(pool.loaded) == 1           # memory bound: one shard at a time
        seen.add(pool.draw(rng).meta["index"])
    assert len(seen) > len(next(iter(pool.loaded.values())))  # other shards were visited


def test_export_makes_the_tables_threshold_the_served_default(micro_world, tmp_path):
    root, report = micro_world
    assets = export_default(root / "teacher" / "model", root / "student" / "adapter",
                            assets=tmp_path / "assets", table=root / "eval" / "table.json")
    served = json.loads((assets / "student" / "generation_config.json").read_text())
    assert served["threshold"] == report["config"]["threshold"]
    assert json.loads((assets / "student" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "../teacher"
    llm = LLM(model=str(assets / "teacher"), lora=str(assets / "student"))
    assert llm.engine.config.threshold == report["config"]["threshold"]
