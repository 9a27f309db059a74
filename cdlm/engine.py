"""LLMEngine: scheduler + model runner + tokenizer. One engine behind the Python API, the CLI
and the HTTP server."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cdlm.page_allocator import PageAllocator
from cdlm.config import DECODING_MODES, DEFAULT_THRESHOLD, EngineConfig
from cdlm.errors import ContextLengthError, InvalidRequestError, QueueFullError
from cdlm.kv_cache import KVCachePool
from cdlm.model_runner import ModelRunner
from cdlm.models.loader import load_model, resolve_device, resolve_model_path
from cdlm.models.transformer import DiffusionLM
from cdlm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from cdlm.sampling_params import SamplingParams
from cdlm.scheduler import Scheduler
from cdlm.sequence import Sequence
from cdlm.tokenizer import Tokenizer

__all__ = ["LLMEngine", "NewRequest", "QueueFullError", "EngineStats", "StepStats"]

logger = logging.getLogger(__name__)

# KV budget when none is configured: this many tokens per running request, capped by memory.
_DEFAULT_TOKENS_PER_SEQ = 2048
_CPU_KV_BYTES_CAP = 128 << 20  # the pool is allocated up front; keep CPU hosts light
_CUDA_KV_FRACTION = 0.5


@dataclass
class StepStats:
    """What one engine step did (for metrics)."""

    batch_size: int = 0
    tokens_finalized: list[int] = field(default_factory=list)  # per request in the step
    block_steps: list[int] = field(default_factory=list)       # per block completed
    prompt_tokens_admitted: int = 0
    duration_s: float = 0.0


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_steps: int = 0
    last_step: StepStats = field(default_factory=StepStats)


@dataclass(frozen=True)
class NewRequest:
    """One request for `LLMEngine.add_requests`."""

    request_id: str
    prompt: str | list[int]          # text (tokenized with the start token) or token ids
    params: SamplingParams
    mode: str | None = None          # None: the engine's default mode
    arrival_time: float | None = None


def checkpoint_threshold(model_dir: str | os.PathLike, lora: str | os.PathLike | None
                         ) -> float | None:
    """The confidence threshold a checkpoint recommends: `threshold` in `generation_config.json`
    of the LoRA adapter (the student defines the operating point), else of the base model."""
    for directory in (lora, model_dir):
        if directory is None:
            continue
        path = Path(directory) / "generation_config.json"
        if path.is_file():
            value = json.loads(path.read_text()).get("threshold")
            if value is not None:
                if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                    raise ValueError(f"{path}: threshold must be a number in (0, 1], got {value!r}")
                return float(value)
    return None


class LLMEngine:
    def __init__(self, model: DiffusionLM, tokenizer: Tokenizer,
                 engine_config: EngineConfig | None = None, model_name: str = "cdlm") -> None:
        self.config = engine_config or EngineConfig()
        if self.config.threshold is None:
            self.config = replace(self.config, threshold=DEFAULT_THRESHOLD)
        self.model = model
        if self.config.compile_layer_ops:
            model.compile_layer_ops()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_config = model.config
        self.block_size = self.config.block_size or model.config.block_size
        self.max_model_len = self.config.max_model_len or model.config.max_position_embeddings
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        page_size = self.config.page_size
        num_pages = self._kv_pages(page_size)
        self.pool = KVCachePool(model.config, num_pages, page_size, self.dtype, self.device,
                                self.block_size)
        self.scheduler = Scheduler(PageAllocator(num_pages, page_size), self.config.max_num_seqs,
                                   self.config.max_queue, self.config.max_prefill_tokens)
        max_pages = -(-(self.max_model_len + self.block_size) // page_size)
        self.runner = ModelRunner(model, self.pool, self.block_size,
                                  max_requests=self.config.max_num_seqs,
                                  max_pages_per_request=max_pages,
                                  engine_seed=self.config.seed,
                                  attention_backend=self.config.attention_backend,
                                  cuda_graphs=self.config.cuda_graphs)
        self.stop_token_ids = frozenset(
            t for t in (model.config.eos_token_id, tokenizer.eot_token_id) if t is not None)
        self.stats = EngineStats()
        self._prompts: dict[str, str | None] = {}
        self._stop_truncation: dict[str, str] = {}

    @classmethod
    def from_pretrained(cls, model: str | None = None, lora: str | None = None,
                        engine_config: EngineConfig | None = None,
                        revision: str | None = None) -> "LLMEngine":
        """Load a checkpoint (directory or hub id), or the bundled default when model is None."""
        engine_config = engine_config or EngineConfig()
        name = model
        if model is None:
            from cdlm.default_model import default_model
            model, default_lora = default_model()
            lora = lora if lora is not None else default_lora
            name = "cdlm-default"
        path = resolve_model_path(model, revision)
        if engine_config.threshold is None:  # still None: __init__ falls back to the default
            adapter = resolve_model_path(lora) if lora is not None else None
            engine_config = replace(engine_config, threshold=checkpoint_threshold(path, adapter))
        network = load_model(path, lora=lora, dtype=engine_config.dtype,
                             device=engine_config.device)
        tokenizer = Tokenizer.from_pretrained(path)
        return cls(network, tokenizer, engine_config, model_name=str(name))

    def _kv_pages(self, page_size: int) -> int:
        if self.config.kv_cache_tokens is not None:
            return self.config.kv_cache_tokens // page_size
        tokens = self.config.max_num_seqs * min(_DEFAULT_TOKENS_PER_SEQ, self.max_model_len)
        per_token = KVCachePool.bytes_per_token(self.model_config, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            cap = int(free * _CUDA_KV_FRACTION)
        else:
            cap = _CPU_KV_BYTES_CAP
        tokens = max(page_size, min(tokens, cap // per_token))
        return tokens // page_size

    # --- requests -----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt: text gets the tokenizer's start token (as Hugging Face's
        `add_special_tokens=True` adds it); token ids are checked against the vocabulary."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            return self.tokenizer.encode_prompt(prompt)
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})",
                                      param="prompt")
        return ids

    def check_context(self, prompt_len: int, max_tokens: int) -> None:
        """Raise ContextLengthError unless prompt + max_tokens fit the context."""
        if prompt_len + max_tokens > self.max_model_len:
            raise ContextLengthError.for_request(self.max_model_len, prompt_len, max_tokens)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    mode: str | None = None, arrival_time: float | None = None) -> None:
        """Queue a request. Raises InvalidRequestError / ContextLengthError (both ValueError)
        for bad input, QueueFullError when the waiting queue is full."""
        self.add_requests([NewRequest(request_id, prompt, params, mode, arrival_time)])

    def add_requests(self, requests: list[NewRequest]) -> None:
        """Queue several requests as one group: every one is validated and the waiting queue
        must hold them all, else none is queued (same errors as `add_request`). A group that
        fits is admitted in the same step."""
        seqs = [self._sequence(r) for r in requests]
        self.scheduler.add_many(seqs)
        for req in requests:
            self._prompts[req.request_id] = req.prompt if isinstance(req.prompt, str) else None
        self._refresh_gauges()

    def _sequence(self, req: NewRequest) -> Sequence:
        mode = req.mode or self.config.default_mode
        if mode not in DECODING_MODES:
            raise InvalidRequestError(
                f"unknown decoding mode {mode!r}; choose one of {DECODING_MODES}", param="mode")
        prompt_ids = self.encode_prompt(req.prompt)
        if not prompt_ids:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        params = req.params
        self.check_context(len(prompt_ids), params.max_tokens)
        return Sequence(
            seq_id=req.request_id, prompt_token_ids=prompt_ids, params=params, mode=mode,
            block_size=self.block_size, mask_token_id=self.model_config.mask_token_id,
            stop_token_ids=self.stop_token_ids | frozenset(params.stop_token_ids),
            threshold=params.threshold if params.threshold is not None else self.config.threshold,
            arrival_time=req.arrival_time if req.arrival_time is not None else time.monotonic())

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its KV pages return to the pool before the next step."""
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._forget(seq.seq_id)
        self._refresh_gauges()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        seqs = scheduled.seqs
        step_stats = StepStats(batch_size=len(seqs),
                               prompt_tokens_admitted=sum(s.prompt_len for s in scheduled.admitted))
        if not seqs:
            self.stats.last_step = step_stats
            self._refresh_gauges()
            return []
        decided, failed = self._execute_isolating_faults(seqs)
        outputs: list[RequestOutput] = []
        for seq, message in failed:
            self.scheduler.finish(seq, "error")
            outputs.append(self._output(seq, error=message))
            self._forget(seq.seq_id)
        ok = [s for s in seqs if not s.is_finished]
        update = self.scheduler.update(ok, [decided[s.seq_id] for s in ok])
        step_stats.tokens_finalized = update.tokens_finalized
        step_stats.block_steps = [steps for _, steps in update.blocks_completed]
        # Report every request that completed a block, hit a stop string or finished: one
        # output each, built once (decoding the text is the costly part).
        block_steps: dict[str, list[int]] = {}
        to_report: dict[str, Sequence] = {}
        for seq, steps in update.blocks_completed:
            block_steps.setdefault(seq.seq_id, []).append(steps)
            to_report[seq.seq_id] = seq
        # A stop string can only appear where this step finalised tokens.
        for seq, finalized in zip(ok, update.tokens_finalized):
            if finalized and seq.params.stop and self._hit_stop_string(seq):
                to_report[seq.seq_id] = seq
        for seq in update.finished:
            to_report[seq.seq_id] = seq
        for seq in to_report.values():
            out = self._output(seq)
            out.new_block_steps = block_steps.get(seq.seq_id, [])
            outputs.append(out)
            if seq.is_finished:
                self._forget(seq.seq_id)
        step_stats.duration_s = time.perf_counter() - started
        self.stats.num_steps += 1
        self.stats.last_step = step_stats
        self._refresh_gauges()
        return outputs

    def _execute_isolating_faults(self, seqs: list[Sequence]
                                  ) -> tuple[dict[str, tuple[list[int], list[int]]],
                                             list[tuple[Sequence, str]]]:
        """Run the step; if it raises, rerun each request alone so one bad request fails alone.
        (Re-running is safe: a pass only writes K/V of final tokens, which is idempotent.)"""
        try:
            results = self.runner.execute(seqs)
            return {s.seq_id: r for s, r in zip(seqs, results)}, []
        except Exception:
            if len(seqs) == 1:
                logger.exception("request %s failed", seqs[0].seq_id)
                return {}, [(seqs[0], "internal error while decoding this request")]
        decided, failed = {}, []
        for seq in seqs:
            try:
                decided[seq.seq_id] = self.runner.execute([seq])[0]
            except Exception:
                logger.exception("request %s failed", seq.seq_id)
                failed.append((seq, "internal error while decoding this request"))
        return decided, failed

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """End the request at the earliest stop string in its final text, if any."""
        tokens = seq.output_token_ids if seq.is_finished else seq.contiguous_output()
        skip = seq.params.skip_special_tokens
        text = self.tokenizer.decode(tokens, skip_special_tokens=skip)
        hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        cut = min(hits)
        # The fewest tokens whose text already contains the stop string.
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            prefix = self.tokenizer.decode(tokens[:mid], skip_special_tokens=skip)
            if any(s in prefix for s in seq.params.stop):
                hi = mid
            else:
                lo = mid + 1
        self._stop_truncation[seq.seq_id] = text[:cut]
        if seq.is_finished:  # ended by an end token in this same step: cut its output too
            seq.output_token_ids = tokens[:lo]
            seq.finish_reason = "stop"
        else:
            self.scheduler.finish(seq, "stop", output_len=lo)
        return True

    def _output(self, seq: Sequence, error: str | None = None) -> RequestOutput:
        finished = seq.is_finished
        tokens = seq.output_token_ids if finished else list(seq.finished_tokens)
        text = self._stop_truncation.get(seq.seq_id)
        if text is None:
            text = self.tokenizer.decode(tokens, skip_special_tokens=seq.params.skip_special_tokens)
            if not finished:
                text = text.rstrip("\ufffd")  # an unfinished UTF-8 character: wait for more
        return RequestOutput(
            request_id=seq.seq_id,
            prompt=self._prompts.get(seq.seq_id),
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[CompletionOutput(index=0, text=text, token_ids=list(tokens),
                                      finish_reason=seq.finish_reason if finished else None,
                                      steps=seq.steps, num_blocks=seq.num_blocks)],
            finished=finished,
            metrics=RequestMetrics(arrival_time=seq.arrival_time,
                                   first_scheduled_time=seq.first_scheduled_time,
                                   first_block_time=seq.first_block_time,
                                   last_block_time=seq.last_block_time,
                                   finished_time=seq.finished_time),
            error=error)

    def _forget(self, request_id: str) -> None:
        self.runner.release(request_id)
        self._prompts.pop(request_id, None)
        self._stop_truncation.pop(request_id, None)

    def _refresh_gauges(self) -> None:
        self.stats.num_running = self.scheduler.num_running
        self.stats.num_waiting = self.scheduler.num_waiting
        self.stats.kv_cache_usage = self.scheduler.page_allocator.usage
