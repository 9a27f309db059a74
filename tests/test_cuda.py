"""The GPU path for real: the Triton kernel, the packed step in fp32 and bf16, CUDA graphs,
one host sync per step, and the sampler's device independence. Skipped without CUDA; run by
scripts/gpu_check.sh on an H100/H200."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _prompts(n: int, seed: int, longest: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randint(1, longest))] for _ in range(n)]


def _engine(path, dtype="float32", **overrides):
    from cdlm.config import EngineConfig
    from cdlm.engine import LLMEngine
    from cdlm.models.loader import load_model
    from cdlm.tokenizer import Tokenizer
    model = load_model(path, device="cuda", dtype=dtype)
    config = EngineConfig(kv_cache_tokens=16384, page_size=16, **overrides)
    return LLMEngine(model, Tokenizer.from_pretrained(path), config)


def _run(engine, prompts, params, mode="cdlm") -> dict:
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p, mode=mode)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.token_ids, out.steps)
    return done


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,page_size,heads,kv_heads,head_dim", [
    (32, 16, 28, 4, 128), (32, 32, 32, 32, 128), (8, 16, 4, 2, 16)])
def test_triton_kernel_equals_the_torch_op(dtype, block_size, page_size, heads, kv_heads,
                                           head_dim):
    from cdlm.kernels.paged_attention import paged_attention_triton
    from cdlm.paged_attention import paged_attention_torch, segment_table, torch_groups
    from fakes import random_paged_case
    seqs, layout, table, pool_k, pool_v, q, scratch = random_paged_case(
        5, block_size, page_size, heads, kv_heads, head_dim, dtype, count=8, device="cuda")
    want = paged_attention_torch(q.float(), pool_k.float(), pool_v.float(),
                                 torch_groups(layout, table, page_size, scratch, torch.float32))
    got = paged_attention_triton(q, pool_k, pool_v, segment_table(layout, table), page_size)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("graphs", [False, True])
def test_packed_step_on_cuda_equals_the_reference(family, graphs, tiny_llada, tiny_dream):
    from cdlm.sampling_params import SamplingParams
    path = (tiny_llada if family == "llada" else tiny_dream)[0]
    engine = _engine(path, threshold=0.3, cuda_graphs=graphs)
    assert engine.runner.attention_backend == "triton"
    rng = random.Random(1)
    prompts = _prompts(16, seed=2)
    params = [SamplingParams(max_tokens=rng.randint(4, 40), temperature=0.0 if i % 3 else 0.8,
                             seed=i) for i in range(len(prompts))]
    cached = _run(engine, prompts, params, "cdlm")
    reference = _run(engine, prompts, params, "reference")
    assert cached == reference
    if graphs:
        assert engine.runner.graphs.enabled and engine.runner.graphs.num_graphs > 0


def test_cuda_graph_replay_decodes_like_eager_steps(tiny_dream):
    from cdlm.sampling_params import SamplingParams
    prompts = _prompts(12, seed=3)
    params = [SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True) for _ in prompts]
    eager = _run(_engine(tiny_dream[0], threshold=0.5, cuda_graphs=False), prompts, params)
    engine = _engine(tiny_dream[0], threshold=0.5, cuda_graphs=True)
    replayed = _run(engine, prompts, params)
    assert replayed == eager
    assert engine.runner.graphs.enabled and engine.runner.graphs.num_graphs > 0


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bf16_packed_logits_track_the_reference(family, tiny_llada, tiny_dream):
    from cdlm.sampling_params import SamplingParams
    from test_exactness import _lockstep
    path = (tiny_llada if family == "llada" else tiny_dream)[0]
    engine = _engine(path, dtype="bfloat16", threshold=0.5)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = _prompts(6, seed=4)
    pairs, _, _ = _lockstep(engine, {0: [(str(i), p, params) for i, p in enumerate(prompts)]},
                            atol=0.15, teacher_forced=True)
    assert len(pairs) == 6


def test_one_host_sync_per_steady_step(tiny_llada):
    from cdlm.sampling_params import SamplingParams
    engine = _engine(tiny_llada[0], threshold=0.9)
    for i, prompt in enumerate(_prompts(4, seed=5)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=64, temperature=0.0,
                                                          ignore_eos=True, tokens_per_step=2))
    engine.step()          # admissions (uploads of new rows) happen here
    engine.step()
    counts = []
    for _ in range(6):
        torch.cuda.set_sync_debug_mode(1)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert max(counts) <= 1, counts


def test_sampling_noise_is_the_same_on_cuda_and_cpu():
    from cdlm.sampler import SamplingTensors, predict_tokens, splitmix64
    keys = torch.tensor([0, 7, -3, 2**61], dtype=torch.long)
    assert torch.equal(splitmix64(keys.cuda()).cpu(), splitmix64(keys))
    logits = torch.randn(4, 32, 300, generator=torch.Generator().manual_seed(0)) * 2

    def draw(device: str) -> torch.Tensor:
        sampling = SamplingTensors(
            temperature=torch.full((4,), 0.9, device=device), top_p=torch.full((4,), 0.95, device=device),
            top_k=torch.zeros(4, dtype=torch.long, device=device), min_p=torch.zeros(4, device=device),
            noise_key=keys.to(device), any_random=True, any_filter=True)
        return predict_tokens(logits.to(device), sampling)[0].cpu()

    agree = (draw("cuda") == draw("cpu")).float().mean()
    assert agree > 0.98   # the same draws; only last-ulp float differences may flip a near-tie
