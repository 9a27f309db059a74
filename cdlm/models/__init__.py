from cdlm.models.transformer import DiffusionLM

__all__ = ["DiffusionLM"]
