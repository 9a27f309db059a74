"""peft-format LoRA adapters, merged into the base weights at load time (free at serving time).

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (or the older
`adapter_model.bin`) with keys `base_model.model.<module path>.lora_{A,B}.weight`. Because our
module paths mirror the real checkpoints, an adapter trained with peft on the family's own
model class, or on ours, names exactly the modules we have.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<which>lora_A|lora_B)(\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    @classmethod
    def from_file(cls, path: Path) -> "LoraSpec":
        raw = json.loads(path.read_text())
        peft_type = str(raw.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise ValueError(f"{path}: only LoRA adapters are supported, got peft_type={peft_type}")
        if raw.get("use_dora"):
            raise ValueError(f"{path}: DoRA adapters are not supported")
        return cls(
            rank=int(raw["r"]),
            alpha=float(raw.get("lora_alpha", raw["r"])),
            use_rslora=bool(raw.get("use_rslora", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            rank_pattern={k: int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
            alpha_pattern={k: float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
        )

    def scale_for(self, module_name: str) -> float:
        """peft's scaling for one module, honouring rank/alpha patterns."""
        rank = _pattern_value(self.rank_pattern, module_name, self.rank)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_value(patterns: dict, module_name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module_name):
            return value
    return default


def load_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        from safetensors.torch import load_file
        return load_file(str(st))
    legacy = adapter_dir / "adapter_model.bin"
    if legacy.exists():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin")


def merge_lora(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Add scale * B @ A to every adapted Linear's weight, in place. Returns the module names."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{adapter_dir}: not a LoRA adapter (no {ADAPTER_CONFIG})")
    spec = LoraSpec.from_file(adapter_dir / ADAPTER_CONFIG)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_adapter_tensors(adapter_dir).items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"{adapter_dir}: unsupported adapter tensor {key!r} "
                             "(only lora_A/lora_B of Linear modules can be merged)")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    modules = dict(model.named_modules())
    merged = []
    for name, pair in sorted(pairs.items()):
        target = modules.get(name)
        if not isinstance(target, nn.Linear):
            raise ValueError(f"{adapter_dir}: adapter targets {name!r}, which is not a Linear "
                             "module of this model (wrong base model?)")
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{adapter_dir}: {name} lacks lora_A or lora_B")
        delta = pair["lora_B"].float() @ pair["lora_A"].float()        # [out, in]
        if spec.fan_in_fan_out:
            delta = delta.T
        if delta.shape != target.weight.shape:
            raise ValueError(f"{adapter_dir}: {name} delta {tuple(delta.shape)} does not match "
                             f"weight {tuple(target.weight.shape)}")
        with torch.no_grad():
            weight = target.weight
            merged_weight = weight.float() + spec.scale_for(name) * delta.to(weight.device)
            weight.copy_(merged_weight.to(weight.dtype))
        merged.append(name)
    if not merged:
        raise ValueError(f"{adapter_dir}: the adapter holds no LoRA weights")
    return merged
