"""cdlm: serving and training for Consistency Diffusion Language Models.

The public names load lazily, so that the torch-free parts (scheduler, sequence, page
allocator, step layout) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "LLM": "cdlm.llm",
    "SamplingParams": "cdlm.sampling_params",
    "RequestOutput": "cdlm.outputs",
    "CompletionOutput": "cdlm.outputs",
    "EngineConfig": "cdlm.config",
    "ModelConfig": "cdlm.config",
}
__all__ = list(_PUBLIC)

if TYPE_CHECKING:
    from cdlm.config import EngineConfig, ModelConfig
    from cdlm.llm import LLM
    from cdlm.outputs import CompletionOutput, RequestOutput
    from cdlm.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'cdlm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
