"""Stage `eval`: the paper's table through the real engine (`cdlm.LLM`), batch 1.

Rows, per task family (all greedy; "no training" rows run the teacher's own weights):
  naive teacher                  bidirectional, block-wise, 1 token per step, and the request
                                 ends once end-of-text is finalised (SPEC 2.5): our baseline
  naive teacher, whole window    the same, but every position of the generation window is
                                 decoded (`ignore_eos`): the paper's baseline, whose step count
                                 is the generation length; its answer is the text before the
                                 first end token
  teacher + threshold t          bidirectional, confidence threshold, no training (Fast-dLLM
                                 "parallel"), at the paper's 0.9 and at the student's threshold
  teacher @ student budget (k)   bidirectional, k tokens per step, k = round(naive steps /
                                 student steps): the teacher cut to the student's step budget
  CDLM student                   block-causal + exact KV cache + threshold (the served model)
  CDLM student @ threshold t     the same student at other thresholds (`student_sweep`)
Columns: accuracy (exact final answer), mean steps, tokens per step, mean latency (wall clock of
`generate` for one request), tokens per second (answer tokens / latency, summed), mean answer
length (tokens up to and including the first end token), and steps / latency relative to the
naive teacher.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cdlm import LLM, SamplingParams
from cdlm.training.data import chat_prompt_ids
from cdlm.training.io_utils import atomic_write_json, atomic_write_text, read_jsonl
from cdlm.training.world.tasks import final_answer

NAIVE = "naive teacher"
NAIVE_WINDOW = "naive teacher, whole window"
STUDENT = "CDLM student"
LEGEND = {
    NAIVE: "1 token per step, ends at end-of-text (ours)",
    NAIVE_WINDOW: "1 token per step over the whole generation window (the paper's baseline)",
    "teacher + threshold": "the teacher's weights, threshold rule, no training (Fast-dLLM "
                           "parallel, no cache)",
    "teacher @ student budget": "the teacher finalising k tokens per step, k = naive steps / "
                                "student steps",
    STUDENT: "block-causal LoRA student, exact KV cache, threshold rule (the served model)",
}


@dataclass
class EvalConfig:
    gen_len: int = 64
    threshold: float = 0.9           # the student's (the served operating point)
    baseline_threshold: float = 0.9  # the paper's, for the training-free teacher row
    student_sweep: tuple[float, ...] = ()   # extra student rows at these thresholds
    limit: int = 0          # prompts per family, 0 = all
    warmup: int = 3         # untimed requests first (allocator, lazy init)

    def __post_init__(self) -> None:
        for t in (self.threshold, self.baseline_threshold, *self.student_sweep):
            if not 0.0 < t <= 1.0:
                raise ValueError(f"thresholds must be in (0, 1], got {t}")


def answer_part(llm: LLM, token_ids: list[int]) -> list[int]:
    """The answer: tokens up to and including the first end token (all when there is none)."""
    stops = llm.engine.stop_token_ids
    for i, t in enumerate(token_ids):
        if t in stops:
            return token_ids[:i + 1]
    return token_ids


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
        answer = answer_part(llm, list(out.token_ids))
        text = out.text if len(answer) == len(out.token_ids) else llm.tokenizer.decode(answer)
        ok = final_answer(text) == r["result"]
        correct += ok
        steps += out.steps
        lengths += len(answer)
        outputs.append({"text": text, "steps": out.steps, "correct": ok})
    n = max(1, len(rows))
    return {"accuracy": correct / n, "mean_steps": steps / n,
            "tokens_per_step": lengths / max(1, steps), "mean_latency_s": latency / n,
            "tokens_per_s": lengths / latency if latency else 0.0,
            "mean_gen_len": lengths / n, "n": len(rows), "samples": outputs[:5]}


def threshold_key(t: float) -> str:
    return f"teacher + threshold {t:g}"


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

        def teacher_row(**params) -> dict:
            return run_rows(teacher, rows, SamplingParams(**greedy, **params), "bidirectional",
                            cfg.warmup)

        table = {NAIVE: teacher_row(tokens_per_step=1),
                 NAIVE_WINDOW: teacher_row(tokens_per_step=1, ignore_eos=True)}
        for t in dict.fromkeys((cfg.baseline_threshold, cfg.threshold)):
            table[threshold_key(t)] = teacher_row(threshold=t)
        cdlm = run_rows(student, rows, SamplingParams(**greedy, threshold=cfg.threshold),
                        "cdlm", cfg.warmup)
        k = max(1, round(table[NAIVE]["mean_steps"] / max(cdlm["mean_steps"], 1e-9)))
        table[f"teacher @ student budget (k={k})"] = teacher_row(tokens_per_step=k)
        table[STUDENT] = cdlm
        for t in cfg.student_sweep:
            if t != cfg.threshold:
                table[f"{STUDENT} @ threshold {t:g}"] = run_rows(
                    student, rows, SamplingParams(**greedy, threshold=t), "cdlm", cfg.warmup)
        results[family] = {**table, "budget_k": k}
    report = {"config": asdict(cfg), "teacher": str(teacher_dir), "student": str(adapter_dir),
              "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "table.json", report)
    atomic_write_text(out_dir / "table.md", markdown_table(report))
    return report


def _ratio(a: float, b: float) -> float:
    return a / max(b, 1e-9)


def markdown_table(report: dict) -> str:
    """The table, a legend of its rows, and the headline ratios of the student per family."""
    cfg = report["config"]
    lines = ["| family | policy | accuracy | mean steps | tokens/step | mean latency (ms) | "
             "tokens/s | mean gen len | steps vs naive | latency vs naive |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for family, rows in report["results"].items():
        naive = rows[NAIVE]
        for name, r in rows.items():
            if not isinstance(r, dict):
                continue
            label = f"{name} ({cfg['threshold']:g})" if name == STUDENT else name
            lines.append(
                f"| {family} | {label} | {100 * r['accuracy']:.1f} | {r['mean_steps']:.1f} | "
                f"{r.get('tokens_per_step', 0.0):.1f} | {1000 * r['mean_latency_s']:.1f} | "
                f"{r['tokens_per_s']:.0f} | {r['mean_gen_len']:.1f} | "
                f"{_ratio(naive['mean_steps'], r['mean_steps']):.1f}x | "
                f"{_ratio(naive['mean_latency_s'], r['mean_latency_s']):.1f}x |")
    lines += ["", "Rows: " + "; ".join(f"*{k}*: {v}" for k, v in LEGEND.items()) + ".", ""]
    lines += [headline(family, rows, cfg) for family, rows in report["results"].items()]
    return "\n".join(lines) + "\n"


def headline(family: str, rows: dict, cfg: dict) -> str:
    """One line per family: the student against each baseline, side by side."""
    s, naive = rows[STUDENT], rows[NAIVE]
    parts = [f"- **{family}**: CDLM student {100 * (s['accuracy'] - naive['accuracy']):+.1f} "
             f"points vs the naive teacher, {_ratio(naive['mean_steps'], s['mean_steps']):.1f}x "
             f"fewer steps, {_ratio(naive['mean_latency_s'], s['mean_latency_s']):.1f}x lower "
             "latency"]
    window = rows.get(NAIVE_WINDOW)
    if window:
        parts.append(f"against the whole-window naive teacher (the paper's baseline) "
                     f"{_ratio(window['mean_steps'], s['mean_steps']):.1f}x fewer steps, "
                     f"{_ratio(window['mean_latency_s'], s['mean_latency_s']):.1f}x lower latency")
    base = rows.get(threshold_key(cfg.get("baseline_threshold", 0.9)))
    if base:
        parts.append(f"against the training-free teacher + threshold "
                     f"{cfg.get('baseline_threshold', 0.9):g} "
                     f"{100 * (s['accuracy'] - base['accuracy']):+.1f} points, "
                     f"{_ratio(base['mean_steps'], s['mean_steps']):.1f}x fewer steps, "
                     f"{_ratio(base['mean_latency_s'], s['mean_latency_s']):.1f}x lower latency")
    return "; ".join(parts) + "."
