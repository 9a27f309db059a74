"""Tiny checkpoints in the exact published layouts, written from *transformers'* own models.

Dream = Qwen2 key names (q/k/v biases, GQA); LLaDA = a Llama whose keys are renamed to LLaDA's
names. The checkpoint therefore comes from an independent implementation; our loader must read
it as published and reproduce the reference logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from cdlm.default_model import write_byte_tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA_TO_LLADA = [
    ("model.embed_tokens.", "model.transformer.wte."),
    ("model.norm.", "model.transformer.ln_f."),
    ("lm_head.", "model.transformer.ff_out."),
    (".self_attn.q_proj.", ".q_proj."),
    (".self_attn.k_proj.", ".k_proj."),
    (".self_attn.v_proj.", ".v_proj."),
    (".self_attn.o_proj.", ".attn_out."),
    (".mlp.gate_proj.", ".ff_proj."),
    (".mlp.up_proj.", ".up_proj."),
    (".mlp.down_proj.", ".ff_out."),
    (".input_layernorm.", ".attn_norm."),
    (".post_attention_layernorm.", ".ff_norm."),
    ("model.layers.", "model.transformer.blocks."),
]


def add_bos_post_processor(tok_dir: Path, bos: str = "<|startoftext|>") -> None:
    """LLaDA's tokenizer puts its BOS `<|startoftext|>` in front of every encoded text
    (`add_special_tokens=True`), as Llama-3-style tokenizer.json files do with a
    TemplateProcessing post-processor; Dream's Qwen2 tokenizer adds nothing."""
    from tokenizers import Tokenizer, processors
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    tok.save(str(tok_dir / "tokenizer.json"))


def llama_key_to_llada(key: str) -> str:
    for old, new in LLAMA_TO_LLADA:
        key = key.replace(old, new)
    return key


def _special_ids(tok_dir: Path) -> dict[str, int]:
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in data["added_tokens"]}


def _save_weights(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if shards <= 1:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))


def _randomise(model: torch.nn.Module, seed: int, scale: float = 0.08) -> None:
    # Larger-than-default weights give peaked, varied confidences, so the threshold rule
    # finalises several tokens in some steps and one in others.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def write_tiny_llada(out: Path, *, seed: int = 0, shards: int = 1, layers: int = 2,
                     hidden: int = 64, heads: int = 4, block_size: int = 8,
                     head_gain: float = 4.0):
    """A LLaDA-layout checkpoint + the transformers Llama it was written from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_tokenizer(out)
    add_bos_post_processor(out)
    ids = _special_ids(out)
    ref_config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=heads, rms_norm_eps=1e-5, rope_theta=500000.0,
                             max_position_embeddings=4096, tie_word_embeddings=False,
                             attention_bias=False, mlp_bias=False)
    reference = LlamaForCausalLM(ref_config).eval()
    _randomise(reference, seed)
    with torch.no_grad():
        reference.lm_head.weight.mul_(head_gain)
    _save_weights({llama_key_to_llada(k): v for k, v in reference.state_dict().items()}, out, shards)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LLaDAModelLM"], "model_type": "llada",
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "activation_type": "silu", "block_type": "llama", "d_model": hidden,
        "embedding_size": vocab, "vocab_size": vocab, "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"], "mask_token_id": ids["<|mdm_mask|>"],
        "include_bias": False, "include_qkv_bias": False, "layer_norm_type": "rms",
        "max_sequence_length": 4096, "mlp_hidden_size": 2 * hidden, "mlp_ratio": 2,
        "n_heads": heads, "n_kv_heads": heads, "n_layers": layers, "rms_norm_eps": 1e-5,
        "rope": True, "rope_theta": 500000.0, "weight_tying": False, "torch_dtype": "float32",
        "cdlm_block_size": block_size}))
    return reference


def write_tiny_dream(out: Path, *, seed: int = 0, shards: int = 1, layers: int = 2,
                     hidden: int = 64, heads: int = 4, kv_heads: int = 2, block_size: int = 8):
    """A Dream-layout checkpoint (Qwen2 keys, GQA, q/k/v biases) + its transformers Qwen2."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_tokenizer(out, chat_template=CHATML_TEMPLATE)
    ids = _special_ids(out)
    ref_config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, rms_norm_eps=1e-6, rope_theta=1e6,
                             max_position_embeddings=4096, tie_word_embeddings=False)
    reference = Qwen2ForCausalLM(ref_config).eval()
    _randomise(reference, seed)
    with torch.no_grad():
        reference.lm_head.weight.mul_(4)
    _save_weights(reference.state_dict(), out, shards)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["DreamModel"], "model_type": "Dream",
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                     "AutoModel": "modeling_dream.DreamModel"},
        "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "vocab_size": vocab, "tie_word_embeddings": False,
        "mask_token_id": ids["<|mdm_mask|>"], "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"], "bos_token_id": ids["<|endoftext|>"],
        "torch_dtype": "float32", "cdlm_block_size": block_size}))
    return reference
