"""Engine behaviour through the public API (`LLM`) and the engine interface the server uses."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cdlm import LLM, SamplingParams
from cdlm.engine import LLMEngine
from cdlm.scheduler import QueueFullError


@pytest.fixture(scope="module")
def llm(tiny_llada) -> LLM:
    return LLM(str(tiny_llada[0]), threshold=0.5)


PROMPTS = ["The quick brown fox", "Once upon a time", "def main():"]


def test_outputs_have_text_tokens_reason_and_steps(llm):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0))
    assert len(outs) == 3
    for out in outs:
        assert isinstance(out.text, str) and out.token_ids
        assert out.finish_reason in ("stop", "length")
        assert 1 <= out.steps <= len(out.token_ids) + 20
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_max_tokens_mid_block(llm):
    out = llm.generate("hello", SamplingParams(max_tokens=11, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 11 and out.finish_reason == "length"
    assert out.outputs[0].num_blocks == 2  # block size 8: one full block + 3 of the next


def test_stop_token_ends_early_and_later_positions_stay_undecoded(llm):
    free = llm.generate("hello", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    stop_id = free.token_ids[len(free.token_ids) // 2]
    out = llm.generate("hello", SamplingParams(max_tokens=24, temperature=0,
                                               stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_id
    assert stop_id not in out.token_ids[:-1] and len(out.token_ids) < 24


def test_stop_string_truncates_text(llm):
    free = llm.generate("Once", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = free.text
    stop = text[5:8]
    assert stop and stop in text
    out = llm.generate("Once", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                              stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.index(stop)]
    assert stop in llm.tokenizer.decode(out.token_ids)


def test_seeded_sampling_is_reproducible_and_batch_invariant(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=42)
    alone = llm.generate("abc", params)[0]
    again = llm.generate("abc", params)[0]
    in_batch = llm.generate(["xyz", "abc", "qq"], [SamplingParams(max_tokens=9, temperature=1.0),
                                                   params, SamplingParams(max_tokens=5)])[1]
    other_seed = llm.generate("abc", SamplingParams(max_tokens=16, temperature=1.0, seed=43))[0]
    assert alone.token_ids == again.token_ids == in_batch.token_ids
    assert alone.token_ids != other_seed.token_ids


def test_chat_end_of_turn_token_stops(llm):
    engine = llm.engine
    eot = engine.tokenizer.token_to_id("<|eot_id|>")
    assert eot is not None and eot in engine.stop_token_ids
    assert engine.model_config.eos_token_id in engine.stop_token_ids
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.startswith("<|startoftext|><|start_header_id|>user")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_naive_baseline_takes_one_token_per_step(llm):
    out = llm.generate("abc", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                             tokens_per_step=1), mode="bidirectional")[0]
    assert out.steps == len(out.token_ids) == 16


def test_bad_requests_raise_clear_errors(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e1", "", SamplingParams())
    with pytest.raises(ValueError, match=r"maximum context length is 4096.*4100"):
        engine.add_request("e2", [1] * 100, SamplingParams(max_tokens=4000))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("e3", [1, 10**9], SamplingParams())
    with pytest.raises(ValueError, match="mode"):
        engine.add_request("e4", "x", SamplingParams(), mode="nope")
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    assert not engine.has_unfinished_requests()


def test_abort_frees_the_cache_within_a_step(llm):
    engine = llm.engine
    engine.add_request("ab", "some prompt", SamplingParams(max_tokens=64, ignore_eos=True))
    engine.step()
    assert engine.stats.kv_cache_usage > 0 and engine.stats.num_running == 1
    engine.abort_request("ab")
    assert engine.stats.kv_cache_usage == 0 and engine.stats.num_running == 0
    assert engine.step() == []


def test_queue_full(tiny_llada):
    from cdlm.config import EngineConfig
    engine = LLMEngine.from_pretrained(str(tiny_llada[0]), engine_config=EngineConfig(
        max_num_seqs=1, max_queue=1))
    engine.add_request("q1", "a", SamplingParams(max_tokens=4))
    with pytest.raises(QueueFullError):
        engine.add_request("q2", "b", SamplingParams(max_tokens=4))


def _run_all(engine: LLMEngine) -> dict:
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
    return results


def test_a_fault_in_one_request_fails_only_that_request(tiny_llada):
    """The fault strikes after the packed step has updated the device-resident state (blocks
    reset and decided): the engine isolates the bad request and the others decode exactly as
    in a run without the fault."""
    params = SamplingParams(max_tokens=20, temperature=0)
    clean = LLMEngine.from_pretrained(str(tiny_llada[0]))
    for rid in ("good1", "good2"):
        clean.add_request(rid, "hello" if rid == "good1" else "other", params)
    expected = _run_all(clean)

    engine = LLMEngine.from_pretrained(str(tiny_llada[0]))
    runner = engine.runner
    original = runner.packed_step

    def faulty(inputs, kv, flags):  # fault injection: a poisoned request breaks any pass it is in
        decided = original(inputs, kv, flags)
        if "bad" in runner.states and runner.states.slot("bad") in inputs.state_slot.tolist():
            raise RuntimeError("injected fault")
        return decided

    runner.packed_step = faulty
    for rid, prompt in (("good1", "hello"), ("bad", "hello"), ("good2", "other")):
        engine.add_request(rid, prompt, params)
    results = _run_all(engine)
    assert results["bad"].finish_reason == "error" and results["bad"].error
    for rid in ("good1", "good2"):
        assert results[rid].error is None
        assert results[rid].token_ids == expected[rid].token_ids
        assert results[rid].steps == expected[rid].steps
    assert engine.stats.kv_cache_usage == 0


def test_step_stats_for_metrics(llm):
    engine = llm.engine
    engine.add_request("s1", "abc", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine.add_request("s2", "abd", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine.step()
    assert engine.stats.last_step.batch_size == 2
    assert engine.stats.last_step.prompt_tokens_admitted > 0
    assert all(n >= 1 for n in engine.stats.last_step.tokens_finalized)
    while engine.has_unfinished_requests():
        outs = engine.step()
        for out in outs:
            assert out.new_block_steps and all(s >= 1 for s in out.new_block_steps)


def test_default_model_loads_without_arguments():
    out = LLM().generate("Hi", SamplingParams(max_tokens=5, temperature=0))[0]
    assert out.finish_reason in ("stop", "length") and out.steps >= 1


def test_cli_generate(tiny_llada):
    for flag in ([], ["--no-kv-cache"]):
        proc = subprocess.run(
            [sys.executable, "-m", "cdlm.cli", "generate", "hello", "--model", str(tiny_llada[0]),
             "--max-tokens", "12", *flag], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "steps=" in proc.stderr and "tokens/s=" in proc.stderr and "latency=" in proc.stderr
    assert "mode=reference" in proc.stderr


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bf16_decoding_runs_all_modes(family, tiny_llada, tiny_dream):
    """The dtype CUDA uses by default, exercised on CPU: cache pool, sampler and all modes."""
    path = (tiny_llada if family == "llada" else tiny_dream)[0]
    llm = LLM(str(path), dtype="bfloat16", threshold=0.3)
    assert llm.engine.pool.k[0].dtype == torch.bfloat16
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    for mode in ("cdlm", "reference", "bidirectional"):
        out = llm.generate(["abc", "hello world"], params, mode=mode)
        assert all(len(o.token_ids) == 20 and o.steps >= 1 for o in out)


def test_threshold_defaults_to_the_checkpoints_generation_config(tiny_llada, tmp_path):
    import json
    import shutil

    from cdlm.engine import checkpoint_threshold

    base = tmp_path / "base"
    shutil.copytree(tiny_llada[0], base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert checkpoint_threshold(base, None) is None
    assert LLMEngine.from_pretrained(str(base)).config.threshold == 0.9   # the paper's default
    (base / "generation_config.json").write_text(json.dumps({"threshold": 0.8}))
    assert LLMEngine.from_pretrained(str(base)).config.threshold == 0.8
    # The adapter (the student) defines the operating point over its base.
    (adapter / "generation_config.json").write_text(json.dumps({"threshold": 0.97}))
    assert checkpoint_threshold(base, adapter) == 0.97
    # An explicit threshold always wins.
    assert LLM(str(base), threshold=0.5).engine.config.threshold == 0.5
    (base / "generation_config.json").write_text(json.dumps({"threshold": 2}))
    with pytest.raises(ValueError, match="threshold"):
        LLMEngine.from_pretrained(str(base))
