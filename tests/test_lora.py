"""peft adapters load, merge, and change the output exactly as peft's own PeftModel does."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from cdlm.lora import merge_lora
from cdlm.models.loader import load_model
from checkpoints import llama_key_to_llada, write_tiny_dream, write_tiny_llada

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train_one_step(peft_model, vocab: int, forward) -> None:
    """One real optimiser step on a masked-prediction loss, so lora_B is no longer zero."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 12), generator=gen)
    targets = torch.randint(0, vocab, (2, 12), generator=gen)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    loss = torch.nn.functional.cross_entropy(forward(ids).flatten(0, 1), targets.flatten())
    loss.backward()
    opt.step()


def _full(ids: torch.Tensor) -> torch.Tensor:
    return torch.ones(ids.shape[0], 1, ids.shape[1], ids.shape[1], dtype=torch.bool)


def test_dream_adapter_trained_with_peft_on_qwen2(tmp_path):
    reference = write_tiny_dream(tmp_path / "base", seed=11)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(reference, config)
    _train_one_step(peft_model, 256, lambda ids: peft_model(ids, attention_mask=_full(ids)).logits)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()

    ids = torch.randint(0, 256, (2, 15), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = peft_model(ids, attention_mask=_full(ids)).logits
        base = load_model(tmp_path / "base", device="cpu")
        before = base.logits(base(ids, attention_mask=_full(ids)))
        merged = load_model(tmp_path / "base", lora=tmp_path / "adapter", device="cpu")
        got = merged.logits(merged(ids, attention_mask=_full(ids)))
    assert (before - expected).abs().max() > 1e-2, "the adapter must change the output"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_llada_adapter_with_llada_module_names(tmp_path):
    """An adapter in LLaDA's module names (as published CDLM students are) merges correctly."""
    reference = write_tiny_llada(tmp_path / "base", seed=12)
    config = LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=HF_TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(reference, config)
    _train_one_step(peft_model, 256, lambda ids: peft_model(ids, attention_mask=_full(ids)).logits)
    peft_model.save_pretrained(tmp_path / "hf_adapter")
    peft_model.eval()
    # Rename the adapter's module paths from Llama's to LLaDA's.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    tensors = load_file(str(tmp_path / "hf_adapter" / "adapter_model.safetensors"))
    save_file({llama_key_to_llada(k): v for k, v in tensors.items()},
              str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "hf_adapter" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))

    ids = torch.randint(0, 256, (2, 15), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = peft_model(ids, attention_mask=_full(ids)).logits
        merged = load_model(tmp_path / "base", lora=adapter, device="cpu")
        got = merged.logits(merged(ids, attention_mask=_full(ids)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_peft_on_our_model_excluding_the_lm_head(tmp_path, tiny_llada):
    """Training with peft on DiffusionLM itself (what training/ does) round-trips too.
    LLaDA's `ff_out` name also matches the top-level lm_head: the regex leaves it out."""
    path, _ = tiny_llada
    model = load_model(path, device="cpu")
    targets = r".*blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert not any("transformer.ff_out.lora" in n for n, _ in peft_model.named_parameters())

    def forward(ids):
        return peft_model.base_model.model.logits(peft_model(ids, attention_mask=_full(ids)))

    _train_one_step(peft_model, 256, forward)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = forward(ids)
        merged = load_model(path, lora=tmp_path / "adapter", device="cpu")
        got = merged.logits(merged(ids, attention_mask=_full(ids)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_adapter_for_another_model_is_rejected(tmp_path, tiny_llada, tiny_dream):
    dream_path, dream_ref = tiny_dream
    peft_model = get_peft_model(dream_ref, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    llada = load_model(tiny_llada[0], device="cpu")
    with pytest.raises(ValueError, match="not a Linear module of this model"):
        merge_lora(llada, tmp_path / "adapter")
