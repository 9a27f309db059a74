"""Load and save checkpoints as published: a local directory or a hub id."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from cdlm.config import ModelConfig
from cdlm.models.hub import resolve_model_path
from cdlm.models.layouts import config_to_dict, read_config

__all__ = ["load_model", "save_pretrained", "load_config", "resolve_model_path",
           "resolve_device", "resolve_dtype"]
load_config = read_config
from cdlm.models.transformer import DiffusionLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some exporters write that carry no learned state.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / SINGLE_FILE
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def iter_checkpoint_tensors(path: Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    for file in weight_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as handle:
            for key in handle.keys():
                if not key.endswith(_IGNORED_SUFFIXES):
                    yield key, handle.get_tensor(key)


def load_model(
    name_or_path: str | os.PathLike,
    lora: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    revision: str | None = None,
) -> DiffusionLM:
    """Build the model on the meta device and assign the checkpoint's tensors (no double copy)."""
    path = resolve_model_path(name_or_path, revision)
    config = load_config(path)
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    with torch.device("meta"):
        model = DiffusionLM(config)
    expected = dict(model.state_dict())
    loaded: dict[str, torch.Tensor] = {}
    for key, tensor in iter_checkpoint_tensors(path, target_device):
        if key not in expected:
            raise ValueError(f"{path}: unexpected tensor {key!r} for a {config.family} model")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[key].shape)}")
        # LoRA is merged in fp32 below when asked, so keep full precision until then.
        loaded[key] = tensor.to(torch.float32 if lora is not None else target_dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(loaded, assign=True, strict=True)
    if lora is not None:
        from cdlm.lora import merge_lora
        merge_lora(model, resolve_model_path(lora))
        model = model.to(target_dtype)
    model.name_or_path = str(name_or_path)  # type: ignore[attr-defined]
    return model.eval()


def save_pretrained(model: DiffusionLM, out_dir: str | os.PathLike,
                    max_shard_bytes: int | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write config.json + safetensors (sharded with an index past max_shard_bytes), atomically."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    state = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    shards = _shard(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(config_to_dict(model.config, dtype_name), indent=2))
    _replace_dir(tmp, out)
    return out


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap a finished temporary directory into place, keeping files written there by others
    (tokenizer files) when `out` already exists."""
    if out.exists():
        for item in out.iterdir():
            stale_weights = item.name.endswith(".safetensors") or item.name == INDEX_FILE
            if item.is_file() and not stale_weights and not (tmp / item.name).exists():
                os.replace(item, tmp / item.name)
        backup = out.with_name(out.name + ".old")
        os.replace(out, backup)
        os.replace(tmp, out)
        import shutil
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, out)
