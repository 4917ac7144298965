#!/usr/bin/env bash
# Multi-node training with DeepSpeed's launcher (pdsh/ssh to every host in the hostfile).
#   HOSTFILE=launch/hostfile launch/deepspeed_hostfile.sh +recipe=fastdraft dist=zero3 [overrides...]
# Run it on the first host; every host needs the same checkout/venv path and a shared run_dir.
# The preflight checks the hostfile and the DeepSpeed settings of every training stage first, so a bad
# input fails here with one message instead of on N nodes after the models are loaded.
set -euo pipefail
HOSTFILE="${HOSTFILE:-launch/hostfile}"
PYTHON="${PYTHON:-python}"
"$PYTHON" -m draftkit.preflight --hostfile "$HOSTFILE" "$@"
MASTER_ADDR="${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}"
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module draftkit.train "$@"
