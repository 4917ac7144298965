#!/usr/bin/env bash
# Multi-node training with torchrun: run this once on every node, with the same MASTER_ADDR/MASTER_PORT and
# NODE_RANK = 0..NNODES-1.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-001 launch/torchrun_multinode.sh +recipe=fastdraft dist=zero2
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node-001 launch/torchrun_multinode.sh +recipe=fastdraft dist=zero2
# NPROC_PER_NODE defaults to the visible GPU count. Use the same hydra.run.dir on a shared filesystem on every
# node (the default run dir has a timestamp, which differs between nodes: set it explicitly).
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
PYTHON="${PYTHON:-python}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
"$PYTHON" -m draftkit.preflight --world-size $((NNODES * NPROC_PER_NODE)) "$@"
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    -m draftkit.train "$@"
