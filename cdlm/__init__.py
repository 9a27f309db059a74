"""cdlm: serving and training for Consistency Diffusion Language Models."""

from cdlm.config import EngineConfig, ModelConfig
from cdlm.llm import LLM
from cdlm.outputs import CompletionOutput, RequestOutput
from cdlm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig",
           "ModelConfig"]
__version__ = "0.1.0"
