"""`LLM`: the offline, vLLM-style Python API over the engine."""

from __future__ import annotations

import itertools
from typing import Sequence as Seq

from tqdm.auto import tqdm

from cdlm.config import EngineConfig
from cdlm.engine import LLMEngine
from cdlm.outputs import RequestOutput
from cdlm.sampling_params import SamplingParams


class LLM:
    """Load a model once, then `generate` batches of prompts.

    `LLM()` serves the bundled default. `use_kv_cache=False` decodes with the block-causal
    reference path (full recompute each step), which must give identical results.
    """

    def __init__(self, model: str | None = None, lora: str | None = None, *,
                 threshold: float | None = None, block_size: int | None = None,
                 dtype: str | None = None, device: str | None = None,
                 use_kv_cache: bool = True, max_num_seqs: int = 64,
                 kv_cache_tokens: int | None = None, seed: int = 0,
                 revision: str | None = None) -> None:
        config = EngineConfig(threshold=threshold, block_size=block_size, dtype=dtype,
                              device=device, max_num_seqs=max_num_seqs,
                              kv_cache_tokens=kv_cache_tokens, seed=seed,
                              default_mode="cdlm" if use_kv_cache else "reference",
                              max_queue=1 << 30)
        self.engine = LLMEngine.from_pretrained(model, lora, config, revision)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, mode: str | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Decode all prompts together (batched forward passes); one output per prompt, in order.

        mode: "cdlm" (default), "reference" (no cache), "bidirectional" (teacher baselines).
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(prompts):
            raise ValueError("need one SamplingParams per prompt (or a single one)")
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params):
            self.engine.add_request(rid, prompt, p, mode=mode)
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), disable=not use_tqdm, desc="generate") as bar:
            while len(finished) < len(prompts):
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[rid] for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None, **kwargs) -> list[RequestOutput]:
        """Apply the model's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.encode_chat(conv) for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, **kwargs)
