"""The bundled default model (cdlm/assets/default) is the trained small-world student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdlm import LLM, SamplingParams
from cdlm.training.world.tasks import FAMILIES, final_answer, generate

ASSETS = Path(__file__).resolve().parents[2] / "cdlm" / "assets" / "default"

pytestmark = pytest.mark.skipif(not (ASSETS / "student" / "adapter_config.json").exists(),
                                reason="no bundled model yet (python -m cdlm.training export-default)")


def test_bundled_files_are_a_llada_checkpoint_and_a_peft_adapter():
    config = json.loads((ASSETS / "teacher" / "config.json").read_text())
    assert config["model_type"] == "llada"
    adapter = json.loads((ASSETS / "student" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total < 30 * 2**20, "the bundled model must stay small"


def test_default_llm_serves_the_student_and_solves_held_out_problems():
    llm = LLM()   # no model: the bundled teacher + CDLM student
    assert llm.engine.model_name == "cdlm-default"
    params = SamplingParams(max_tokens=64, temperature=0.0)
    for family in FAMILIES:
        problems = generate(family, "test", 10, seed=0)
        outs = llm.chat([[{"role": "user", "content": p.prompt}] for p in problems], params)
        correct = sum(final_answer(o.text) == p.result for o, p in zip(outs, problems))
        assert correct >= 7, (family, [o.text for o in outs])
        # Several tokens per step: far fewer steps than generated tokens.
        assert sum(o.steps for o in outs) * 3 < sum(len(o.token_ids) for o in outs)


def test_default_llm_decodes_at_the_tables_threshold():
    table = json.loads((ASSETS / "table.json").read_text())
    assert LLM().engine.config.threshold == table["config"]["threshold"]
