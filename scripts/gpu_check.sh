#!/usr/bin/env bash
# The one-shot GPU check, for whoever gets an H100/H200: on a fresh machine with nothing but this
# repository and the machine's own Python/PyTorch/Triton, run the CUDA test subset (bf16
# tolerances) and both benchmarks, writing everything to one folder. About 5-8 minutes.
#
#   scripts/gpu_check.sh [OUT_DIR]        (default: $OUT when set, else ./gpu_check_out)
#
# Packages: it uses the interpreter in $PYTHON (default python3) as it is. Anything it lacks is
# installed from ./.whl (wheels carried next to the repo, for machines without a registry) or,
# failing that, from the package index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - start ))s] $*" | tee -a "$OUT_DIR/summary.txt"; }

missing=$("$PY" - <<'PYEOF'
import importlib.util
need = ["torch", "triton", "numpy", "safetensors", "tokenizers", "jinja2", "tqdm",
        "huggingface_hub", "transformers", "pytest", "pytest_timeout"]
print(" ".join(n.replace("_", "-") for n in need if importlib.util.find_spec(n) is None))
PYEOF
)
if [ -n "$missing" ]; then
  log "installing: $missing"
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --find-links .whl $missing || log "pip from .whl failed"
  else
    "$PY" -m pip install -q $missing || log "pip install failed"
  fi
fi

{ nvidia-smi || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT_DIR/environment.txt" 2>&1
log "environment: $(tail -1 "$OUT_DIR/environment.txt")"

timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py \
  > "$OUT_DIR/cuda_tests.txt" 2>&1
log "CUDA tests (rc=$?): $(tail -1 "$OUT_DIR/cuda_tests.txt")"

timeout 240 "$PY" benchmarks/gpu_step.py --out "$OUT_DIR/bench_gpu.json" \
  > "$OUT_DIR/bench_gpu.txt" 2>&1
log "gpu_step (rc=$?)"
cat "$OUT_DIR/bench_gpu.txt"

timeout 150 "$PY" benchmarks/ar_baseline.py --out "$OUT_DIR/bench_ar.json" \
  > "$OUT_DIR/bench_ar.txt" 2>&1
log "ar_baseline (rc=$?)"
cat "$OUT_DIR/bench_ar.txt"
log "done"
