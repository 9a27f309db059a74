"""Real prompt sets: parquet files, `datasets` directories (save_to_disk, and a dataset repo's
layout of parquet files), column mappings for prompt/answer pairs and conversations
(Bespoke-Stratos-17k's shape), the chat template, and the paper's 512-token filter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdlm.tokenizer import Tokenizer
from launch import run
from cdlm.training.collect import CollectConfig, collect, prepare_prompts
from cdlm.training.prompts import PromptColumns, load_prompt_rows
from cdlm.training.trajectories import iter_trajectories

datasets = pytest.importorskip("datasets")

SYSTEM = "Your role as an assistant involves thoroughly exploring questions ."
STRATOS = [  # Bespoke-Stratos-17k's columns: system, conversations [{from, value}]
    {"system": SYSTEM, "conversations": [
        {"from": "user", "value": "trace : a = 3 ; b = a + 4 ; print b"},
        {"from": "assistant", "value": "3 + 4 = 7 ; #### 7 " + "and so on . " * 40}]},
    {"system": SYSTEM, "conversations": [
        {"from": "user", "value": "trace : z = 8 ; y = z - 5 ; print y"},
        {"from": "assistant", "value": "8 - 5 = 3 ; #### 3"}]},
    {"system": SYSTEM, "conversations": [   # 600 words: over the 512-token filter
        {"from": "user", "value": " ".join(["trace"] * 600)},
        {"from": "assistant", "value": "#### 0"}]},
]
PAIRS = [{"question": "trace : a = 2 ; print a", "solution": "#### 2", "id": 7},
         {"question": "trace : a = 5 ; print a", "solution": "#### 5", "id": 8}]
MESSAGES = [{"messages": [{"role": "user", "content": "trace : a = 1 ; print a"},
                          {"role": "assistant", "content": "#### 1"}], "source": "x"}]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    out = {}
    out["parquet"] = root / "pairs.parquet"
    datasets.Dataset.from_list(PAIRS).to_parquet(str(out["parquet"]))
    out["stratos"] = root / "stratos"               # save_to_disk of a DatasetDict
    datasets.DatasetDict({"train": datasets.Dataset.from_list(STRATOS)}).save_to_disk(
        str(out["stratos"]))
    out["repo"] = root / "repo"                     # a dataset repo: data/<split>-*.parquet
    (out["repo"] / "data").mkdir(parents=True)
    datasets.Dataset.from_list(MESSAGES).to_parquet(
        str(out["repo"] / "data" / "train-00000-of-00001.parquet"))
    out["jsonl"] = root / "native.jsonl"
    out["jsonl"].write_text("".join(json.dumps({"prompt": p["question"], "answer":
                                                p["solution"], "family": "code"}) + "\n"
                                    for p in PAIRS))
    return out


def test_prompt_answer_columns_from_parquet(sources):
    rows = load_prompt_rows([sources["parquet"]], PromptColumns(prompt="question",
                                                                answer="solution"))
    assert rows == [{"id": 7, "prompt": PAIRS[0]["question"], "answer": "#### 2"},
                    {"id": 8, "prompt": PAIRS[1]["question"], "answer": "#### 5"}]
    with pytest.raises(ValueError, match="no 'prompt' column"):
        load_prompt_rows([sources["parquet"]])


def test_conversations_from_a_saved_dataset_in_bespoke_stratos_shape(sources):
    rows = load_prompt_rows([sources["stratos"]],
                            PromptColumns(messages="conversations", system="system"))
    assert rows[1] == {"messages": [{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": "trace : z = 8 ; y = z - 5 ; "
                                                                "print y"}],
                       "prompt": "trace : z = 8 ; y = z - 5 ; print y",
                       "answer": "8 - 5 = 3 ; #### 3"}
    with pytest.raises(ValueError, match="no split 'test'"):
        load_prompt_rows([sources["stratos"]], PromptColumns(messages="conversations",
                                                             split="test"))


def test_openai_messages_from_a_dataset_repo_directory(sources):
    rows = load_prompt_rows([sources["repo"]], PromptColumns(messages="messages"))
    assert rows == [{"source": "x", "messages": [{"role": "user",
                                                  "content": "trace : a = 1 ; print a"}],
                     "prompt": "trace : a = 1 ; print a", "answer": "#### 1"}]


def test_native_jsonl_rows_are_kept_as_they_are(sources):
    rows = load_prompt_rows([sources["jsonl"]])
    assert rows[0] == {"prompt": PAIRS[0]["question"], "answer": "#### 2", "family": "code"}


def test_bad_rows_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"row 0: the conversation has no assistant turn"):
        load_prompt_rows([path], PromptColumns(messages="messages"))
    with pytest.raises(FileNotFoundError):
        load_prompt_rows([tmp_path / "missing.jsonl"])


def test_chat_template_and_the_512_token_filter(micro_world, sources):
    root, _ = micro_world
    teacher = root / "teacher" / "model"
    tok = Tokenizer.from_pretrained(teacher)
    cfg = CollectConfig(messages_field="conversations", system_field="system")
    ready = prepare_prompts([sources["stratos"]], tok, cfg)
    assert ready.skipped_long == 1 and len(ready.rows) == 2          # the 600-word prompt
    assert ready.prompt_ids[1] == tok.encode_chat(ready.rows[1]["messages"])
    assert tok.decode(ready.prompt_ids[1], skip_special_tokens=False).count("<|start_header_id|>") == 3
    keep_all = prepare_prompts([sources["stratos"]], tok,
                               CollectConfig(messages_field="conversations", max_prompt_tokens=0))
    assert keep_all.skipped_long == 0 and len(keep_all.rows) == 3


def test_collect_from_a_conversations_dataset_through_the_cli(micro_world, sources, tmp_path):
    root, _ = micro_world
    teacher = root / "teacher" / "model"
    out = tmp_path / "traj"
    printed = run(["collect", "--model", str(teacher), "--prompts", str(sources["stratos"]),
                   "--messages-field", "conversations", "--system-field",
                   "system", "--out", str(out), "--batch-size", "4", "--device", "cpu"]).stdout
    assert "1 skipped as longer than 512 tokens" in printed
    tok = Tokenizer.from_pretrained(teacher)
    trajs = list(iter_trajectories(out))
    assert len(trajs) == 2
    assert trajs[0].prompt_ids.tolist() == tok.encode_chat(
        [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": STRATOS[0]["conversations"][0]["value"]}])
    assert trajs[0].answer_ids.shape[0] == 64       # a long answer is cut to the window
    assert json.loads((out / "index.json").read_text())["skipped_long_prompts"] == 1
