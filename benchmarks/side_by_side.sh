#!/bin/bash
# CPU benchmarks of this engine and an older checkout, alternating, in one machine window:
# step cost (benchmarks/step_cost.py) and HTTP serving (benchmarks/serve.py) on the bundled model.
#   benchmarks/side_by_side.sh OLD_CHECKOUT WORLD_DATA_DIR [OUT_DIR]
# OLD_CHECKOUT: e.g. `git worktree add --detach /tmp/old 5907d41`; WORLD_DATA_DIR: a world's data/.
set -u
OLD=$1; DATA=$2; OUT=${3:-bench_side}
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
cat "$DATA"/math-test.jsonl "$DATA"/code-test.jsonl > "$OUT/world-test.jsonl"
T=$PWD/cdlm/assets/default/teacher; S=$PWD/cdlm/assets/default/student
for round in 1 2; do
  for eng in new old; do
    if [ $eng = old ]; then PP=$OLD; else PP=; fi
    PYTHONPATH=$PP $PY benchmarks/step_cost.py --steps 5 --threads 1 \
      --out "$OUT/step_cost_${eng}_$round.md" > "$OUT/step_cost_${eng}_$round.log" 2>&1
  done
done
for round in 1 2; do
  for eng in new old; do
    if [ $eng = old ]; then PP=$OLD; else PP=; fi
    PYTHONPATH=$PP $PY -c "import sys; from cdlm.cli import main; sys.exit(main())" serve \
      --port 8123 --num-threads 1 --model "$T" --lora "$S" --threshold 0.9 \
      > "$OUT/server_$eng.log" 2>&1 &
    PID=$!
    for _ in $(seq 60); do curl -sf localhost:8123/health >/dev/null && break; sleep 1; done
    $PY benchmarks/serve.py --base-url http://127.0.0.1:8123 --dataset "$OUT/world-test.jsonl" \
      --chat --num-prompts 96 --max-concurrency 1,4,16 --rounds 3 --output-len 64 \
      --temperature 0 --markdown "$OUT/serve_${eng}_$round.md" > "$OUT/serve_${eng}_$round.log" 2>&1
    kill -TERM $PID; wait $PID
  done
done
