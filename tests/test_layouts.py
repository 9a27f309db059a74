"""Real checkpoint layouts load as published and match an independent reference implementation."""

from __future__ import annotations

import json

import pytest
import torch

from cdlm.models.loader import load_model, save_pretrained
from cdlm.models.transformer import DiffusionLM
from checkpoints import write_tiny_dream, write_tiny_llada


def _full_mask(batch: int, seq: int) -> torch.Tensor:
    return torch.ones(batch, 1, seq, seq, dtype=torch.bool)


def _ours(model: DiffusionLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(ids, attention_mask=_full_mask(*ids.shape)))


def _theirs(reference, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference(ids, attention_mask=_full_mask(*ids.shape)).logits


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("shards", [1, 3])
def test_checkpoint_matches_transformers_reference(tmp_path, family, shards):
    writer = write_tiny_llada if family == "llada" else write_tiny_dream
    reference = writer(tmp_path, seed=7, shards=shards)
    if shards > 1:
        assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path, dtype="float32", device="cpu")
    assert model.config.family == family
    ids = torch.randint(0, 256, (3, 19), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_ours(model, ids), _theirs(reference, ids), rtol=1e-4, atol=1e-4)


def test_dream_layout_details(tiny_dream):
    path, _ = tiny_dream
    model = load_model(path, device="cpu")
    cfg = model.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, cfg.prediction_shift) == (4, 2, True, 1)
    names = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    assert "lm_head.weight" in names


def test_llada_layout_details(tiny_llada):
    path, _ = tiny_llada
    model = load_model(path, device="cpu")
    assert model.config.prediction_shift == 0 and model.config.rope_rotation_in_fp32
    names = set(model.state_dict())
    assert {"model.transformer.wte.weight", "model.transformer.ff_out.weight",
            "model.transformer.blocks.1.attn_out.weight", "model.transformer.ln_f.weight"} <= names


def test_default_dtype_is_fp32_on_cpu_and_overridable(tiny_llada):
    path, _ = tiny_llada
    assert next(load_model(path, device="cpu").parameters()).dtype == torch.float32
    assert next(load_model(path, device="cpu", dtype="bfloat16").parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_save_pretrained_roundtrip_in_family_format(tmp_path, family):
    writer = write_tiny_llada if family == "llada" else write_tiny_dream
    writer(tmp_path / "src", seed=3)
    model = load_model(tmp_path / "src", device="cpu")
    save_pretrained(model, tmp_path / "dst", max_shard_bytes=40_000)
    raw = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert raw["model_type"] == ("llada" if family == "llada" else "Dream")
    assert (tmp_path / "dst" / "model.safetensors.index.json").exists()
    again = load_model(tmp_path / "dst", device="cpu")
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_bad_checkpoints_fail_clearly(tmp_path, tiny_llada):
    path, _ = tiny_llada
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported checkpoint"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope")


def test_hub_id_resolves_through_the_hub_cache(tmp_path, monkeypatch, tiny_dream):
    """A hub id goes through huggingface_hub; offline it is served from the standard cache."""
    import shutil
    path, _ = tiny_dream
    repo = tmp_path / "hub" / "models--tiny-org--tiny-dream"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(path, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model = load_model("tiny-org/tiny-dream", device="cpu")
    assert model.config.family == "dream"
