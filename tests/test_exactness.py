"""The cached CDLM path equals the uncached block-causal reference: same tokens, same steps,
logits within float tolerance at every step (including Dream's first position of a block)."""

from __future__ import annotations

import random

import pytest
import torch

from cdlm.config import EngineConfig
from cdlm.engine import LLMEngine
from cdlm.models.loader import load_model
from cdlm.sampling_params import SamplingParams
from cdlm.tokenizer import Tokenizer


def _engine(path, **overrides) -> LLMEngine:
    cfg = EngineConfig(kv_cache_tokens=8192, page_size=16, **overrides)
    return LLMEngine(load_model(path, device="cpu"), Tokenizer.from_pretrained(path), cfg)


def _random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def _lockstep(engine: LLMEngine, prompts, params: SamplingParams) -> tuple[list, list, int]:
    """Decode every prompt twice in the same steps, cached and reference, comparing logits."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"c{i}", prompt, params, mode="cdlm")
        engine.add_request(f"r{i}", prompt, params, mode="reference")
    runner, scheduler = engine.runner, engine.scheduler
    finished: dict[str, object] = {}
    compared = 0
    while scheduler.has_unfinished():
        seqs = scheduler.schedule().seqs
        cached = [s for s in seqs if s.mode == "cdlm"]
        reference = [s for s in seqs if s.mode == "reference"]
        assert [s.seq_id[1:] for s in cached] == [s.seq_id[1:] for s in reference]
        runner.keep_logits = True
        decided_c = runner.execute(cached)
        logits_c = runner.step_logits()
        decided_r = runner.execute(reference)
        logits_r = runner.step_logits()
        torch.testing.assert_close(logits_c, logits_r, rtol=1e-4, atol=1e-4)
        compared += 1
        assert decided_c == decided_r
        for group, decided in ((cached, decided_c), (reference, decided_r)):
            for seq in scheduler.update(group, decided).finished:
                finished[seq.seq_id] = seq
    ids = sorted(k[1:] for k in finished if k.startswith("c"))
    return ([finished["c" + i] for i in ids], [finished["r" + i] for i in ids], compared)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("threshold,temperature", [(0.9, 0.0), (0.3, 0.0), (0.5, 1.0)])
def test_cached_equals_reference_stepwise(family, threshold, temperature, tiny_llada, tiny_dream):
    path = (tiny_llada if family == "llada" else tiny_dream)[0]
    engine = _engine(path, threshold=threshold)
    params = SamplingParams(max_tokens=29, temperature=temperature, seed=1234)
    cached, reference, compared = _lockstep(engine, _random_prompts(6, seed=hash(family) % 100), params)
    assert len(cached) == 6 and compared > 0
    for c, r in zip(cached, reference):
        assert c.output_token_ids == r.output_token_ids
        assert (c.steps, c.finish_reason) == (r.steps, r.finish_reason)
    assert any(c.num_blocks >= 2 for c in cached), "must cross block boundaries"
    assert engine.scheduler.block_manager.usage == 0.0


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_generate_cached_equals_reference_many_prompts(family, tiny_llada, tiny_dream):
    """Black box, through the public API: many random prompts and lengths."""
    from cdlm import LLM
    path = (tiny_llada if family == "llada" else tiny_dream)[0]
    llm = LLM(str(path), threshold=0.2, kv_cache_tokens=16384)
    rng = random.Random(3)
    prompts = _random_prompts(24, seed=5)
    params = [SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.0) for _ in prompts]
    cached = llm.generate(prompts, params, mode="cdlm")
    reference = llm.generate(prompts, params, mode="reference")
    total_tokens = total_steps = 0
    for c, r in zip(cached, reference):
        assert c.token_ids == r.token_ids
        assert c.steps == r.steps
        total_tokens += len(c.token_ids)
        total_steps += c.steps
    assert total_tokens > total_steps, "the threshold must finalise several tokens in some steps"


def test_batched_equals_one_by_one(tiny_dream):
    from cdlm import LLM
    llm = LLM(str(tiny_dream[0]), threshold=0.5)
    prompts = _random_prompts(8, seed=9)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    together = llm.generate(prompts, params)
    alone = [llm.generate(p, params)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.steps for o in together] == [o.steps for o in alone]
