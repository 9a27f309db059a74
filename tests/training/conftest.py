"""Fixtures: a tiny real LLaDA-layout checkpoint with the small world's tokenizer."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from cdlm.models.loader import save_pretrained
from cdlm.models.transformer import DiffusionLM
from cdlm.tokenizer import Tokenizer
from cdlm.training.teacher import TOKENIZER_FILES, TeacherConfig, model_config
from cdlm.training.world.tokenizer import save_tokenizer

torch.set_num_threads(1)
# Helpers beside the tests (launch.py, real_configs.py) import by their plain names.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def world_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, world_tokenizer_dir) -> Path:
    """Random weights, but a real checkpoint on disk: loads through load_model and LLM."""
    out = tmp_path_factory.mktemp("teacher") / "model"
    tok = Tokenizer.from_pretrained(world_tokenizer_dir)
    cfg = TeacherConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        block_size=8, gen_len=16)
    torch.manual_seed(0)
    model = DiffusionLM(model_config(cfg, tok))
    for p in model.parameters():      # larger weights than default init: peaked predictions
        torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else None
    save_pretrained(model, out)
    for name in TOKENIZER_FILES:
        shutil.copy(world_tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory) -> tuple[Path, dict]:
    """`python -m cdlm.training world --preset micro`: every stage for real, in seconds."""
    from cdlm.training.world.pipeline import WorldConfig, run_world
    root = tmp_path_factory.mktemp("world")
    report = run_world(root, WorldConfig.preset("micro"), log=lambda *_: None)
    return root, report
