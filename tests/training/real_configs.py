"""config.json of the two real families with their published shapes (SPEC section 4), for dry
runs: no weights, so `--dry-run` can be checked (and documented) on the real sizes."""

from __future__ import annotations

import json
from pathlib import Path

LLADA_8B = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada",
    "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32,
    "mlp_hidden_size": 12288, "vocab_size": 126464, "embedding_size": 126464,
    "max_sequence_length": 4096, "rope": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
    "layer_norm_type": "rms", "activation_type": "silu", "block_type": "llama",
    "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
    "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081,
}
DREAM_7B = {
    "architectures": ["DreamModel"], "model_type": "Dream",
    "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "intermediate_size": 18944, "hidden_act": "silu",
    "vocab_size": 152064, "max_position_embeddings": 131072, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "mask_token_id": 151666, "eos_token_id": 151643, "pad_token_id": 151643,
}
REAL_CONFIGS = {"llada-8b": LLADA_8B, "dream-7b": DREAM_7B}


def write_real_config(out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(REAL_CONFIGS[name], indent=2) + "\n")
    return out
