"""Stage `choose-threshold`: the student's decoding threshold, chosen on the validation split.

The served threshold trades steps for accuracy. It is picked here, on problems that the eval
table never uses: the lowest candidate at which the student's accuracy is within `max_drop`
points of the naive teacher's on every family (the lowest threshold finalises the most tokens
per step). `max_drop` defaults to 1 point, half the 2-point target, as margin for the noise of
200 problems. When no candidate qualifies, the highest is taken.

Requests are batched (greedy outputs are batch-invariant: tests/test_exactness.py), so this
measures accuracy and steps, not latency.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from cdlm import LLM, SamplingParams
from cdlm.training.data import chat_prompt_ids
from cdlm.training.io_utils import atomic_write_json, read_jsonl
from cdlm.training.world.tasks import final_answer


@dataclass
class ChoiceConfig:
    candidates: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)
    max_drop: float = 1.0    # accuracy points below the naive teacher allowed on validation
    gen_len: int = 64
    batch: int = 64

    def __post_init__(self) -> None:
        if not self.candidates or any(not 0.0 < t <= 1.0 for t in self.candidates):
            raise ValueError(f"candidates must be thresholds in (0, 1], got {self.candidates}")


def score(llm: LLM, rows: list[dict], params: SamplingParams, mode: str) -> dict:
    """Accuracy (percent) and mean steps of one policy over rows, batched."""
    prompts = [chat_prompt_ids(llm.tokenizer, r["prompt"]) for r in rows]
    outs = llm.generate(prompts, params, mode=mode)
    correct = sum(final_answer(o.text) == r["result"] for o, r in zip(outs, rows))
    return {"accuracy": 100.0 * correct / max(1, len(rows)),
            "mean_steps": sum(o.steps for o in outs) / max(1, len(outs))}


def pick(naive: dict[str, dict], by_threshold: dict[float, dict[str, dict]],
         max_drop: float) -> float:
    """The lowest threshold whose accuracy is within max_drop of naive on every family."""
    for t in sorted(by_threshold):
        if all(by_threshold[t][f]["accuracy"] >= naive[f]["accuracy"] - max_drop
               for f in naive):
            return t
    return max(by_threshold)


def choose_threshold(teacher_dir: Path, adapter_dir: Path, val_files: dict[str, Path],
                     out_path: Path, cfg: ChoiceConfig) -> float:
    """Measure on validation, write out_path (the measurements and the choice), return it."""
    if out_path.exists():
        import json
        return float(json.loads(out_path.read_text())["threshold"])
    rows = {f: read_jsonl(p) for f, p in val_files.items()}
    greedy = dict(max_tokens=cfg.gen_len, temperature=0.0)
    teacher = LLM(model=str(teacher_dir), max_num_seqs=cfg.batch)
    naive = {f: score(teacher, r, SamplingParams(**greedy, tokens_per_step=1), "bidirectional")
             for f, r in rows.items()}
    del teacher
    student = LLM(model=str(teacher_dir), lora=str(adapter_dir), max_num_seqs=cfg.batch)
    by_threshold = {t: {f: score(student, r, SamplingParams(**greedy, threshold=t), "cdlm")
                        for f, r in rows.items()} for t in cfg.candidates}
    chosen = pick(naive, by_threshold, cfg.max_drop)
    atomic_write_json(out_path, {
        "threshold": chosen, "config": asdict(cfg), "split": "val",
        "naive_teacher": naive,
        "student": {f"{t:g}": v for t, v in by_threshold.items()},
        "rule": "lowest candidate with student accuracy >= naive - max_drop on every family"})
    return chosen
