"""Stage `eval`: the paper's table through the real engine (`cdlm.LLM`), batch 1.

Rows, per task family:
  naive teacher        bidirectional, block-wise, 1 token per step (the paper's baseline)
  teacher + threshold  bidirectional, confidence threshold, no training (Fast-dLLM "parallel")
  teacher @ budget     bidirectional, k tokens per step, k = round(naive steps / student steps):
                       the teacher cut to the student's step budget
  CDLM student         block-causal + exact KV cache + threshold (the served model)
  CDLM student @ t     the same student at other thresholds (`student_sweep`): the
                       speed/accuracy curve the operating point was picked from
Columns: accuracy (exact final answer), mean steps, mean latency (wall clock of `generate` for
one request), tokens per second (generated tokens / latency, summed), mean generated length.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cdlm import LLM, SamplingParams
from training.data import chat_prompt_ids
from training.io_utils import atomic_write_json, atomic_write_text, read_jsonl
from training.world.tasks import final_answer


@dataclass
class EvalConfig:
    gen_len: int = 64
    threshold: float = 0.9
    student_sweep: tuple[float, ...] = ()   # extra student rows at these thresholds
    limit: int = 0          # prompts per family, 0 = all
    warmup: int = 3         # untimed requests first (allocator, lazy init)


def run_rows(llm: LLM, rows: list[dict], params: SamplingParams, mode: str,
             warmup: int) -> dict:
    """Decode every row alone (batch 1) and measure."""
    prompts = [chat_prompt_ids(llm.tokenizer, r["prompt"]) for r in rows]
    for p in prompts[:warmup]:
        llm.generate([p], params, mode=mode)
    correct, steps, latency, lengths, outputs = 0, 0, 0.0, 0, []
    for r, p in zip(rows, prompts):
        t0 = time.perf_counter()
        out = llm.generate([p], params, mode=mode)[0]
        latency += time.perf_counter() - t0
        ok = final_answer(out.text) == r["result"]
        correct += ok
        steps += out.steps
        lengths += len(out.token_ids)
        outputs.append({"text": out.text, "steps": out.steps, "correct": ok})
    n = max(1, len(rows))
    return {"accuracy": correct / n, "mean_steps": steps / n, "mean_latency_s": latency / n,
            "tokens_per_s": lengths / latency if latency else 0.0,
            "mean_gen_len": lengths / n, "n": len(rows), "samples": outputs[:5]}


def evaluate(teacher_dir: Path, adapter_dir: Path, test_files: dict[str, Path], out_dir: Path,
             cfg: EvalConfig) -> dict:
    teacher = LLM(model=str(teacher_dir), threshold=cfg.threshold, max_num_seqs=1)
    student = LLM(model=str(teacher_dir), lora=str(adapter_dir), threshold=cfg.threshold,
                  max_num_seqs=1)
    greedy = dict(max_tokens=cfg.gen_len, temperature=0.0)
    results: dict[str, dict] = {}
    for family, path in test_files.items():
        rows = read_jsonl(path)
        rows = rows[:cfg.limit] if cfg.limit else rows
        naive = run_rows(teacher, rows, SamplingParams(**greedy, tokens_per_step=1),
                         "bidirectional", cfg.warmup)
        thresh = run_rows(teacher, rows, SamplingParams(**greedy, threshold=cfg.threshold),
                          "bidirectional", cfg.warmup)
        cdlm = run_rows(student, rows, SamplingParams(**greedy, threshold=cfg.threshold),
                        "cdlm", cfg.warmup)
        k = max(1, round(naive["mean_steps"] / max(cdlm["mean_steps"], 1e-9)))
        cut = run_rows(teacher, rows, SamplingParams(**greedy, tokens_per_step=k),
                       "bidirectional", cfg.warmup)
        results[family] = {"naive teacher": naive, "teacher + threshold": thresh,
                           f"teacher @ student budget (k={k})": cut, "CDLM student": cdlm,
                           "budget_k": k}
        for t in cfg.student_sweep:
            if t != cfg.threshold:
                results[family][f"CDLM student @ threshold {t}"] = run_rows(
                    student, rows, SamplingParams(**greedy, threshold=t), "cdlm", cfg.warmup)
    report = {"config": asdict(cfg), "teacher": str(teacher_dir), "student": str(adapter_dir),
              "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "table.json", report)
    atomic_write_text(out_dir / "table.md", markdown_table(report))
    return report


def markdown_table(report: dict) -> str:
    lines = ["| family | policy | accuracy | mean steps | mean latency (ms) | tokens/s | "
             "mean gen len | steps vs naive | latency vs naive |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for family, rows in report["results"].items():
        naive = rows["naive teacher"]
        for name, r in rows.items():
            if not isinstance(r, dict):
                continue
            lines.append(
                f"| {family} | {name} | {100 * r['accuracy']:.1f} | {r['mean_steps']:.1f} | "
                f"{1000 * r['mean_latency_s']:.1f} | {r['tokens_per_s']:.0f} | "
                f"{r['mean_gen_len']:.1f} | {naive['mean_steps'] / max(r['mean_steps'], 1e-9):.1f}x | "
                f"{naive['mean_latency_s'] / max(r['mean_latency_s'], 1e-9):.1f}x |")
    return "\n".join(lines) + "\n"
