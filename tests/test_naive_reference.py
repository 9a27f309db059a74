"""The engine's naive teacher (bidirectional, one token per step) and collect's trajectories
follow the fp64 reference of low-confidence remasking position by position, step by step, on
the bundled teacher and on tiny random checkpoints of both layouts, fp32 and bf16."""

from __future__ import annotations

import random

import pytest
import torch

from cdlm.config import EngineConfig
from cdlm.engine import LLMEngine
from cdlm.models.loader import load_model
from cdlm.sampling_params import SamplingParams
from cdlm.tokenizer import Tokenizer
from reference_decoding import naive_decode


def _engine_trajectory(engine: LLMEngine, prompt: list[int], gen_len: int
                       ) -> list[tuple[int, int]]:
    """Run one request alone, step by step, recording what each step finalised."""
    params = SamplingParams(max_tokens=gen_len, temperature=0.0, tokens_per_step=1)
    engine.add_request("q", prompt, params, mode="bidirectional")
    scheduler, runner = engine.scheduler, engine.runner
    trajectory = []
    while scheduler.has_unfinished():
        seqs = scheduler.schedule().seqs
        decided = runner.execute(seqs)
        (positions, tokens), = decided
        seq = seqs[0]
        trajectory += [(len(seq.finished_tokens) + p, t) for p, t in zip(positions, tokens)]
        for done in scheduler.update(seqs, decided).finished:
            engine._forget(done.seq_id)
    return trajectory


def _check(path, dtype: str, prompts: list[list[int]], gen_len: int, block_size: int | None):
    model = load_model(path, device="cpu", dtype=dtype)
    tok = Tokenizer.from_pretrained(path)
    engine = LLMEngine(model, tok, EngineConfig(block_size=block_size))
    stop = set(engine.stop_token_ids)
    compared = 0
    for prompt in prompts:
        want = naive_decode(model, prompt, gen_len, engine.block_size, stop)
        got = _engine_trajectory(engine, prompt, gen_len)
        assert got == want
        compared += len(want)
    return compared


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_naive_order_equals_reference_on_random_checkpoints(family, dtype, tiny_llada,
                                                                   tiny_dream):
    path = (tiny_llada if family == "llada" else tiny_dream)[0]
    rng = random.Random(8)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(2, 20))] for _ in range(3)]
    assert _check(path, dtype, prompts, gen_len=20, block_size=None) > 30


def test_saturated_confidences_keep_the_reference_order(tmp_path):
    """Logit gaps far past fp32 softmax saturation: many positions would score exactly 1.0."""
    from checkpoints import write_tiny_llada
    write_tiny_llada(tmp_path, seed=3, head_gain=60.0)
    rng = random.Random(2)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(2, 12))] for _ in range(3)]
    assert _check(tmp_path, "float32", prompts, gen_len=16, block_size=None) > 20


def test_engine_and_collect_follow_the_reference_on_the_bundled_teacher():
    from cdlm.default_model import default_model
    from cdlm.training.data import chat_prompt_ids
    from cdlm.training.decode import decode_bidirectional
    from cdlm.training.world.tasks import FAMILIES, generate
    teacher, _ = default_model()
    tok = Tokenizer.from_pretrained(teacher)
    prompts = [chat_prompt_ids(tok, p.prompt) for family in FAMILIES
               for p in generate(family, "test", 2, seed=3)]
    gen_len = 64
    assert _check(teacher, "float32", prompts, gen_len, block_size=32) > 40
    # collect's batched decoder records the same order: the step of each position.
    model = load_model(teacher, device="cpu", dtype="float32")
    stop = {model.config.eos_token_id, tok.eot_token_id} - {None}
    res = decode_bidirectional(model, prompts, gen_len, 32, stop, tokens_per_step=1)
    for i, prompt in enumerate(prompts):
        want = naive_decode(model, prompt, gen_len, 32, stop)
        steps = res.steps[i]
        order = sorted((int(s), pos) for pos, s in enumerate(steps.tolist()) if s >= 0)
        assert [(pos, int(res.tokens[i, pos])) for _, pos in order] == want
