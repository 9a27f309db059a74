from cdlm.models.transformer import DiffusionLM, KVWrite

__all__ = ["DiffusionLM", "KVWrite"]
