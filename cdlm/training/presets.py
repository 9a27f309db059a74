"""The paper's recipe for the two real families, as `--preset` defaults of `collect` and `distill`.

From the paper (SPEC section 3): generation length 256, block 32, teacher trajectories with the
naive policy (one token per step, greedy), prompts of at most 512 tokens, LoRA on attention and
MLP, loss weights (1, 0.5, 0.01) for Dream and (1, 0.5, 0.1) for LLaDA, 16 epochs at effective
batch 64 on 4 A100 80GB. Not published, chosen here:
  LoRA r=32, alpha=32   the common choice of related work (SPEC section 4 note)
  lr 1e-5, warm-up 50   the top of the 5e-6..1e-5 range related work uses at this scale
                        (untested here at 7-8B: no GPU on the development machines)
  micro-batch 8, gradient checkpointing, bf16 base: `--dry-run` puts this at about 33 GiB
                        per GPU for Dream-7B and LLaDA-8B (room on an A100 80GB; 16 rows,
                        no accumulation, is estimated at about 55 GiB; docs/training.md)
Any flag given on the command line overrides its preset value.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    model: str                  # the hub id of the teacher / student base
    prompts_hint: str           # what the paper trained on
    collect: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)


_COLLECT = dict(gen_len=256, block_size=32, batch_size=32, chunk_size=256,
                max_prompt_tokens=512, hidden_dtype="float16")
_DISTILL = dict(lora_r=32, lora_alpha=32, batch_size=64, micro_batch_size=8, epochs=16.0,
                lr=1e-5, warmup=50, w_distill=1.0, w_cons=0.5, base_dtype="bfloat16",
                gradient_checkpointing=True, max_shards=8, ckpt_every=100, log_every=10)

PRESETS: dict[str, Preset] = {
    "dream-7b": Preset(
        model="Dream-org/Dream-v0-Instruct-7B",
        prompts_hint="about 7.5k reasoning and math prompts",
        collect=dict(_COLLECT), distill={**_DISTILL, "w_dlm": 0.01}),
    "llada-8b": Preset(
        model="GSAI-ML/LLaDA-8B-Instruct",
        prompts_hint="about 15k reasoning and math prompts",
        collect=dict(_COLLECT), distill={**_DISTILL, "w_dlm": 0.1}),
}


def preset_defaults(name: str, stage: str) -> dict:
    """The flag defaults a preset sets for `stage` ("collect" or "distill")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dict(getattr(PRESETS[name], stage))
