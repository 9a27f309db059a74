"""The cached CDLM path (one packed pass over the paged pool) equals the uncached block-causal
reference: same tokens, same steps, logits within float tolerance at every step (including
Dream's first position of a block), with admissions, commits, finishes and aborts mixed in the
same steps, pages smaller and larger than a block, and prompts spanning many pages."""

from __future__ import annotations

import random

import pytest
import torch

from cdlm.config import EngineConfig
from cdlm.engine import LLMEngine
from cdlm.models.loader import load_model
from cdlm.sampling_params import SamplingParams
from cdlm.tokenizer import Tokenizer


def _engine(path, page_size: int = 16, dtype: str = "float32", **overrides) -> LLMEngine:
    cfg = EngineConfig(kv_cache_tokens=8192, page_size=page_size, **overrides)
    model = load_model(path, device="cpu", dtype=dtype)
    return LLMEngine(model, Tokenizer.from_pretrained(path), cfg)


def _random_prompts(n: int, seed: int, longest: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randint(1, longest))] for _ in range(n)]


def _step_kinds(seqs) -> set[str]:
    kinds = set()
    for s in seqs:
        if s.num_cached == 0:
            kinds.add("admission")
        elif s.num_pending_commit:
            kinds.add("commit")
        else:
            kinds.add("plain")
    return kinds


def _lockstep(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]],
              aborts: dict[int, list[str]] | None = None, atol: float = 1e-4,
              teacher_forced: bool = False):
    """Decode every request twice in the same steps, cached (`c<id>`) and reference (`r<id>`),
    comparing logits and decisions at every step. Requests arrive and are aborted at the
    given step numbers. With `teacher_forced`, both paths apply the reference's decisions (low
    precision, where near-ties may legitimately round differently)."""
    aborts = aborts or {}
    runner, scheduler = engine.runner, engine.scheduler
    finished: dict[str, object] = {}
    seen_kinds: list[set[str]] = []
    aborted: list[str] = []
    step = 0
    while step <= max(arrivals) or scheduler.has_unfinished():
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request("c" + rid, prompt, params, mode="cdlm")
            engine.add_request("r" + rid, prompt, params, mode="reference")
        for rid in aborts.get(step, []):
            if any(s.seq_id == "c" + rid for s in scheduler.running):
                aborted.append(rid)
            engine.abort_request("c" + rid)
            engine.abort_request("r" + rid)
        step += 1
        seqs = scheduler.schedule().seqs
        cached = [s for s in seqs if s.mode == "cdlm"]
        reference = [s for s in seqs if s.mode == "reference"]
        assert [s.seq_id[1:] for s in cached] == [s.seq_id[1:] for s in reference]
        if not cached:
            continue
        seen_kinds.append(_step_kinds(cached))
        runner.keep_logits = True
        decided_c = runner.execute(cached)
        logits_c = runner.step_logits()
        decided_r = runner.execute(reference)
        logits_r = runner.step_logits()
        torch.testing.assert_close(logits_c.float(), logits_r.float(), rtol=atol, atol=atol)
        if teacher_forced:
            decided_c = decided_r
        else:
            assert decided_c == decided_r
        for group, decided in ((cached, decided_c), (reference, decided_r)):
            for seq in scheduler.update(group, decided).finished:
                finished[seq.seq_id] = seq
        if teacher_forced:
            for seq in cached:
                if not seq.is_finished:
                    runner.states.restore_block(seq.seq_id, seq.block)
        for seq in list(finished.values()):
            engine._forget(seq.seq_id)
    ids = sorted(k[1:] for k in finished if k.startswith("c"))
    pairs = [(finished["c" + i], finished["r" + i]) for i in ids]
    return pairs, seen_kinds, aborted


def _assert_same(pairs):
    for c, r in pairs:
        assert c.output_token_ids == r.output_token_ids
        assert (c.steps, c.finish_reason) == (r.steps, r.finish_reason)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("threshold,temperature", [(0.9, 0.0), (0.3, 0.0), (0.5, 1.0)])
def test_cached_equals_reference_stepwise(family, threshold, temperature, tiny_llada, tiny_dream):
    path = (tiny_llada if family == "llada" else tiny_dream)[0]
    engine = _engine(path, threshold=threshold)
    params = SamplingParams(max_tokens=29, temperature=temperature, seed=1234)
    prompts = _random_prompts(6, seed=hash(family) % 100)
    pairs, _, _ = _lockstep(engine, {0: [(str(i), p, params) for i, p in enumerate(prompts)]})
    assert len(pairs) == 6
    _assert_same(pairs)
    assert any(c.num_blocks >= 2 for c, _ in pairs), "must cross block boundaries"
    assert engine.scheduler.page_allocator.usage == 0.0


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("page_size", [16, 32])
def test_mixed_steps_with_arrivals_commits_finishes_and_aborts(family, page_size, tiny_llada,
                                                               tiny_dream):
    """Requests arrive while others commit blocks, denoise or finish; some are aborted
    mid-way; prompts span several pages; greedy and seeded sampling share the steps."""
    path = (tiny_llada if family == "llada" else tiny_dream)[0]
    engine = _engine(path, page_size=page_size, threshold=0.4)
    rng = random.Random(11)
    arrivals: dict[int, list] = {}
    for i, prompt in enumerate(_random_prompts(14, seed=21, longest=90)):
        sampled = i % 3 == 0
        params = SamplingParams(max_tokens=rng.randint(3, 30), seed=100 + i,
                                temperature=0.8 if sampled else 0.0, ignore_eos=i % 4 == 0)
        arrivals.setdefault(rng.randint(0, 8), []).append((str(i), prompt, params))
    pairs, kinds, aborted = _lockstep(engine, arrivals, aborts={4: ["2"], 6: ["9"]})
    _assert_same(pairs)
    assert any({"admission", "commit", "plain"} <= k for k in kinds), kinds
    assert aborted, "an abort must land while its request runs"
    assert engine.scheduler.page_allocator.usage == 0.0


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bf16_cached_logits_track_the_reference(family, tiny_llada, tiny_dream):
    """bf16 weights: the two paths round differently (packed vs dense kernels), so both follow
    the reference's decisions and the logits must agree to bf16 accuracy at every step."""
    path = (tiny_llada if family == "llada" else tiny_dream)[0]
    engine = _engine(path, dtype="bfloat16", threshold=0.5)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = _random_prompts(5, seed=4, longest=50)
    pairs, _, _ = _lockstep(engine, {0: [(str(i), p, params) for i, p in enumerate(prompts)]},
                         atol=0.15, teacher_forced=True)
    assert len(pairs) == 5 and all(c.num_blocks >= 2 for c, _ in pairs)


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


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_batched_equals_one_by_one(temperature, tiny_dream):
    from cdlm import LLM
    llm = LLM(str(tiny_dream[0]), threshold=0.5)
    prompts = _random_prompts(8, seed=9)
    params = [SamplingParams(max_tokens=20, temperature=temperature, seed=i)
              for i in range(len(prompts))]
    together = llm.generate(prompts, params)
    alone = [llm.generate(p, q)[0] for p, q in zip(prompts, params)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.steps for o in together] == [o.steps for o in alone]
