#!/usr/bin/env bash
# torchrun equivalent of accelerate_4gpu.yaml: one node, 4 GPU processes.
#   deploy/training/torchrun_4gpu.sh collect --model TEACHER --prompts train.jsonl --out runs/trajectories
#   deploy/training/torchrun_4gpu.sh distill --base TEACHER --trajectories runs/trajectories --out runs/student
# NPROC_PER_NODE overrides the process count (one per GPU). Multi-node: run it on every node
# with NNODES, NODE_RANK and MASTER_ADDR set (c10d rendezvous on MASTER_ADDR:MASTER_PORT).
set -euo pipefail
NPROC_PER_NODE="${NPROC_PER_NODE:-4}"
NNODES="${NNODES:-1}"
if [ "${NNODES}" = "1" ]; then
  exec torchrun --standalone --nnodes 1 --nproc_per_node "${NPROC_PER_NODE}" -m cdlm.training "$@"
fi
exec torchrun --nnodes "${NNODES}" --node_rank "${NODE_RANK:?set NODE_RANK}" \
  --nproc_per_node "${NPROC_PER_NODE}" \
  --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
  --rdzv_id "${RDZV_ID:-cdlm}" -m cdlm.training "$@"
