"""Attention of a packed pass over the paged pool: the plain-torch op against the definition
(per query, per head, straight from the page table), and the Triton kernel, run on CPU under
the Triton interpreter, against the torch op."""

from __future__ import annotations

import random

import pytest
import torch

# Without CUDA, tests/conftest.py selects Triton's interpreter for the kernel tests below; on
# a CUDA machine the kernel runs for real in tests/test_cuda.py and these tests skip.
from cdlm.paged_attention import paged_attention_torch, segment_table, torch_groups
from fakes import attention_definition as _definition
from fakes import random_paged_case as _case

triton_available = True
try:
    import triton  # noqa: F401
except ImportError:
    triton_available = False


@pytest.mark.parametrize("block_size,page_size", [(8, 2), (8, 16), (32, 16), (32, 32)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_torch_op_equals_the_definition(block_size, page_size, heads, kv_heads):
    seqs, layout, table, pool_k, pool_v, q, scratch = _case(
        block_size + page_size + heads, block_size, page_size, heads, kv_heads, 16, torch.float64)
    groups = torch_groups(layout, table, page_size, scratch, torch.float64)
    got = paged_attention_torch(q, pool_k, pool_v, groups)
    torch.testing.assert_close(got, _definition(seqs, layout, pool_k, pool_v, q, page_size))


def test_torch_op_in_bf16_is_within_bf16_error():
    seqs, layout, table, pool_k, pool_v, q, scratch = _case(3, 32, 16, 4, 2, 32, torch.bfloat16)
    got = paged_attention_torch(q, pool_k, pool_v, torch_groups(layout, table, 16, scratch,
                                                                torch.bfloat16))
    want = _definition(seqs, layout, pool_k, pool_v, q, 16)
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not triton_available, reason="triton is not installed")
@pytest.mark.parametrize("block_size,page_size,heads,kv_heads,head_dim", [
    (8, 2, 4, 4, 16), (8, 16, 4, 2, 16), (32, 16, 4, 1, 32), (32, 32, 2, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_equals_the_torch_op(block_size, page_size, heads, kv_heads, head_dim,
                                           dtype):
    from cdlm.kernels.paged_attention import interpreted, paged_attention_triton
    if not interpreted():
        pytest.skip("TRITON_INTERPRET was set to something else before this module loaded")
    seqs, layout, table, pool_k, pool_v, q, scratch = _case(
        7 + head_dim, block_size, page_size, heads, kv_heads, head_dim, dtype, count=5)
    want = paged_attention_torch(q.float(), pool_k.float(), pool_v.float(),
                                 torch_groups(layout, table, page_size, scratch, torch.float32))
    got = paged_attention_triton(q, pool_k, pool_v, segment_table(layout, table), page_size)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.skipif(not triton_available, reason="triton is not installed")
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_engine_with_the_triton_kernel_decodes_like_the_torch_op(family, tiny_llada, tiny_dream):
    """The whole engine, step by step, with the fused kernel (interpreted) in every layer."""
    from cdlm.config import EngineConfig
    from cdlm.engine import LLMEngine
    from cdlm.kernels.paged_attention import interpreted
    from cdlm.sampling_params import SamplingParams
    if not interpreted():
        pytest.skip("TRITON_INTERPRET was set to something else before this module loaded")
    path = str((tiny_llada if family == "llada" else tiny_dream)[0])
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, 40))] for _ in range(5)]
    params = [SamplingParams(max_tokens=rng.randint(5, 20), temperature=0.0 if i % 2 else 0.9,
                             seed=i) for i in range(len(prompts))]
    outputs = {}
    for backend in ("torch", "triton"):
        engine = LLMEngine.from_pretrained(path, engine_config=EngineConfig(
            threshold=0.4, attention_backend=backend, page_size=16))
        assert engine.runner.attention_backend == backend
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), prompt, p)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = (out.token_ids, out.steps)
        outputs[backend] = done
    assert outputs["triton"] == outputs["torch"]
