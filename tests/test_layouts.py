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


# config.json of the published checkpoints (GSAI-ML/LLaDA-8B-Instruct, Dream-org/
# Dream-v0-Instruct-7B), every field as shipped.
LLADA_8B_INSTRUCT = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
    "d_model": 4096, "embedding_dropout": 0.0, "embedding_size": 126464,
    "eos_token_id": 126081, "flash_attention": False, "include_bias": False,
    "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada",
    "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32,
    "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
    "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
    "vocab_size": 126464, "weight_tying": False}
DREAM_V0_INSTRUCT_7B = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                 "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "mask_token_id": 151666,
    "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "Dream",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "pad_token_id": 151643, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064}


def test_published_configs_load_with_their_real_values():
    from cdlm.models.layouts import config_from_dict
    llada = config_from_dict(LLADA_8B_INSTRUCT)
    assert (llada.num_layers, llada.hidden_size, llada.num_kv_heads, llada.intermediate_size,
            llada.vocab_size, llada.rope_theta, llada.tie_word_embeddings,
            llada.max_position_embeddings) == (32, 4096, 32, 12288, 126464, 500000.0, False, 4096)
    dream = config_from_dict(DREAM_V0_INSTRUCT_7B)
    assert (dream.num_layers, dream.num_heads, dream.num_kv_heads, dream.vocab_size,
            dream.rope_theta, dream.max_position_embeddings) == (28, 28, 4, 152064, 1e6, 131072)


@pytest.mark.parametrize("field,value", [
    ("scale_logits", True), ("input_emb_norm", True), ("layer_norm_type", "default"),
    ("layer_norm_type", "gemma_rms"), ("layer_norm_type", "low_precision"), ("alibi", True),
    ("rope", False), ("clip_qkv", 8.0), ("activation_type", "swiglu"),
    ("activation_type", "gelu"), ("block_type", "sequential"), ("attention_layer_norm", True),
    ("layer_norm_with_affine", False), ("bias_for_layer_norm", True),
    ("rope_full_precision", False), ("include_bias", True), ("multi_query_attention", True),
    ("tie_word_embeddings", True)])
def test_llada_values_the_model_does_not_implement_are_refused(field, value):
    from cdlm.models.layouts import config_from_dict
    with pytest.raises(ValueError, match=rf"unsupported LLaDA config: {field}="):
        config_from_dict({**LLADA_8B_INSTRUCT, field: value})


@pytest.mark.parametrize("field,value", [
    ("hidden_act", "gelu"), ("use_sliding_window", True), ("mlp_bias", True),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("rope_scaling", {"type": "linear", "factor": 2.0})])
def test_dream_values_the_model_does_not_implement_are_refused(field, value):
    from cdlm.models.layouts import config_from_dict
    with pytest.raises(ValueError, match=rf"unsupported Dream config: {field}="):
        config_from_dict({**DREAM_V0_INSTRUCT_7B, field: value})


def test_absent_fields_take_the_reference_codes_defaults():
    """configuration_llada defaults: rope False, block_type sequential, activation swiglu,
    layer_norm_type default, weight_tying True. A config that omits them does not describe
    this model, except weight tying, which is implemented."""
    from cdlm.models.layouts import config_from_dict
    for field in ("rope", "block_type", "activation_type", "layer_norm_type"):
        raw = {k: v for k, v in LLADA_8B_INSTRUCT.items() if k != field}
        with pytest.raises(ValueError, match=field):
            config_from_dict(raw)
    untied = {k: v for k, v in LLADA_8B_INSTRUCT.items() if k != "weight_tying"}
    assert config_from_dict(untied).tie_word_embeddings
    mqa = {**LLADA_8B_INSTRUCT, "multi_query_attention": True, "n_kv_heads": None}
    assert config_from_dict(mqa).num_kv_heads == 1
    no_mlp_size = {**LLADA_8B_INSTRUCT, "mlp_hidden_size": None}
    assert config_from_dict(no_mlp_size).intermediate_size == 4 * 4096


def test_a_refused_checkpoint_fails_at_load_with_the_field_named(tmp_path, tiny_llada):
    import shutil
    path, _ = tiny_llada
    shutil.copytree(path, tmp_path / "ckpt")
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**raw, "scale_logits": True}))
    with pytest.raises(ValueError, match="scale_logits"):
        load_model(tmp_path / "ckpt", device="cpu")
