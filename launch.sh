#!/usr/bin/env bash
# The one entry point for training, from one CPU machine to many GPU nodes.
#
#   ./launch.sh                                   # the demo: CPU -> two local ranks
#   CONFIG=pretrain/configs/paper/early_932m.yaml NGPUS=8 ./launch.sh run.dir=runs/e932m
#   CONFIG=... HOSTFILE=hostfile ./launch.sh train.max_steps=20000   # multi-node (pdsh)
#
# Environment:
#   CONFIG       YAML recipe (default pretrain/configs/demo.yaml)
#   NGPUS        ranks per node (default: all visible GPUs; 2 on a machine without a GPU)
#   HOSTFILE     DeepSpeed hostfile for multi-node runs ("host slots=N" lines)
#   NNODES       nodes to use from the hostfile (default: all of them)
#   MASTER_ADDR  rendezvous host (default: first host of the hostfile, else 127.0.0.1)
#   MASTER_PORT  rendezvous port (default: a free port on one node, 29500 with a HOSTFILE)
#   PYTHON       interpreter (default .venv/bin/python if present, else python3)
# Extra arguments are dotted config overrides (section.key=value), passed through unchanged.
# The config is validated before any process starts; the final command is echoed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

CONFIG="${CONFIG:-pretrain/configs/demo.yaml}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
# Single node: a free port, so two jobs on one machine never meet in one rendezvous.
# Multi-node (HOSTFILE): every node must agree, so the fixed default 29500.
if [ -z "${MASTER_PORT:-}" ] && [ -z "${HOSTFILE:-}" ]; then
  MASTER_PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
fi
MASTER_PORT="${MASTER_PORT:-29500}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE="${WANDB_MODE:-offline}"
BIN_DIR="$(dirname "$PYTHON")"
DEEPSPEED="${DEEPSPEED:-$BIN_DIR/deepspeed}"
[ -x "$DEEPSPEED" ] || DEEPSPEED=deepspeed

has_gpu=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$has_gpu" = "1" ]; then
  NGPUS="${NGPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
else
  export DS_ACCELERATOR=cpu
  NGPUS="${NGPUS:-2}"
  # Two ranks share the cores; one BLAS thread each avoids oversubscription.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

NODES=1
launcher_args=(--num_gpus "$NGPUS" --master_port "$MASTER_PORT")
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "launch.sh: HOSTFILE '$HOSTFILE' not found" >&2; exit 2; }
  NODES=$(grep -cvE '^\s*(#|$)' "$HOSTFILE")
  NODES="${NNODES:-$NODES}"
  MASTER_ADDR="${MASTER_ADDR:-$(grep -vE '^\s*(#|$)' "$HOSTFILE" | head -1 | awk '{print $1}')}"
  launcher_args=(--hostfile "$HOSTFILE" --num_nodes "$NODES" --num_gpus "$NGPUS"
                 --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi
WORLD=$((NODES * NGPUS))

# The demo's data is generated on first use (deterministic, about 10 s).
data_root=$("$PYTHON" -m pretrain.config "$CONFIG" "$@" --print 2>/dev/null | "$PYTHON" -c \
  'import sys, yaml; print(yaml.safe_load(sys.stdin)["data"]["root"])' 2>/dev/null || true)
if [ "$data_root" = "data/demo" ] && [ ! -f data/demo/manifest.json ]; then
  echo "+ $PYTHON tools/make_demo_data.py --out data/demo"
  "$PYTHON" tools/make_demo_data.py --out data/demo
fi

# Fail on a bad config here, before any rank starts.
"$PYTHON" -m pretrain.config "$CONFIG" --world-size "$WORLD" "$@"

cmd=("$DEEPSPEED" "${launcher_args[@]}" pretrain/train.py --config "$CONFIG" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
