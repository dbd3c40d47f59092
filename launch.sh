#!/usr/bin/env bash
# The one entry point for training, from one CPU machine to many GPU nodes.
#
#   ./launch.sh                                   # the demo: CPU -> two local ranks
#   CONFIG=pretrain/configs/paper/early_932m.yaml NGPUS=8 ./launch.sh run.dir=runs/e932m
#   CONFIG=... HOSTFILE=hostfile ./launch.sh train.max_steps=20000            # multi-node (pdsh)
#   CONFIG=... HOSTFILE=hostfile ./launch.sh run.dir=runs/x -- --launcher slurm --ssh_port 2222
#   CONFIG=... LAUNCHER=torchrun ./launch.sh run.dir=runs/x -- --nnodes 2 --node_rank 0 --master_addr n1
#   sbatch tools/slurm/train.sbatch              # SLURM: srun, one task per GPU (LAUNCHER=srun)
#   CONFIG=pretrain/configs/demo_moe.yaml ./launch.sh --print   # dry run: resolve, validate, start nothing
#
# Arguments: dotted config overrides (section.key=value); everything after `--` goes to the
# launcher unchanged. `--print` as the first argument: validate the config's values (not its data
# files), print it resolved and the command, start nothing. Environment:
#   CONFIG       YAML recipe (default pretrain/configs/demo.yaml)
#   LAUNCHER     deepspeed (default) | torchrun | srun (inside a SLURM allocation)
#   NGPUS        ranks per node (default: all visible GPUs; 2 on a machine without a GPU). With a
#                HOSTFILE the hostfile's slots decide, unless NGPUS is set.
#   HOSTFILE     DeepSpeed hostfile for multi-node runs ("host slots=N" lines)
#   NNODES       nodes to use from the hostfile (default: all of them)
#   MASTER_ADDR  rendezvous host (default: first host of the hostfile, else 127.0.0.1)
#   MASTER_PORT  rendezvous port (default: a free port on one node, 29500 with a HOSTFILE)
#   PYTHON       interpreter (default .venv/bin/python if present, else python3)
# The config is validated before any process starts; the final command is echoed. Multi-node
# DeepSpeed runs carry OMP_NUM_THREADS, PYTHONPATH, NCCL_* and WANDB_* to every node
# (pretrain/launch/command.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

CONFIG="${CONFIG:-pretrain/configs/demo.yaml}"
DRY_RUN=0
if [ "${1:-}" = "--print" ]; then DRY_RUN=1; shift; fi
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
# Single node: a free port, so two jobs on one machine never meet in one rendezvous.
# Multi-node (HOSTFILE): every node must agree, so the fixed default 29500.
# SLURM (LAUNCHER=srun): each task derives one from the job id unless MASTER_PORT is set.
if [ "${LAUNCHER:-deepspeed}" != "srun" ]; then
  if [ -z "${MASTER_PORT:-}" ] && [ -z "${HOSTFILE:-}" ]; then
    MASTER_PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  fi
  MASTER_PORT="${MASTER_PORT:-29500}"
  export MASTER_PORT
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE="${WANDB_MODE:-offline}"
BIN_DIR="$(dirname "$PYTHON")"
DEEPSPEED="${DEEPSPEED:-$BIN_DIR/deepspeed}"
[ -x "$DEEPSPEED" ] || DEEPSPEED=deepspeed

NGPUS_SET="${NGPUS:-}"
has_gpu=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$has_gpu" = "1" ]; then
  NGPUS="${NGPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
else
  export DS_ACCELERATOR=cpu
  NGPUS="${NGPUS:-2}"
  # Two ranks share the cores; one BLAS thread each avoids oversubscription.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "launch.sh: HOSTFILE '$HOSTFILE' not found" >&2; exit 2; }
  NGPUS="$NGPUS_SET"  # the hostfile's slots decide ranks per node, not this machine's GPUs
fi
if [ "${LAUNCHER:-deepspeed}" = "srun" ]; then
  NGPUS="$NGPUS_SET"  # srun takes the allocation's tasks per node unless NGPUS says otherwise
fi

# Config overrides before `--`, launcher arguments after it.
overrides=()
for a in "$@"; do
  [ "$a" = "--" ] && break
  overrides+=("$a")
done

# The demo's data is generated on first use (deterministic, about 10 s); not in a dry run.
if [ "$DRY_RUN" = 0 ]; then
  data_root=$("$PYTHON" -m pretrain.config "$CONFIG" "${overrides[@]}" --print --skip-files 2>/dev/null | "$PYTHON" -c \
    'import sys, yaml; print(yaml.safe_load(sys.stdin)["data"]["root"])' 2>/dev/null || true)
  if [ "$data_root" = "data/demo" ] && [ ! -f data/demo/manifest.json ]; then
    echo "+ $PYTHON tools/make_demo_data.py --out data/demo"
    "$PYTHON" tools/make_demo_data.py --out data/demo
  fi
fi

export CONFIG PYTHON DEEPSPEED NGPUS
plan=$("$PYTHON" -m pretrain.launch.command "$@") || exit 2
mapfile -t lines <<< "$plan"
WORLD="${lines[0]}"
ENV_FILE="${lines[1]}"
cmd=("${lines[@]:2}")

# Fail on a bad config here, before any rank starts.
world_arg=()
[ "$WORLD" != "?" ] && world_arg=(--world-size "$WORLD")
[ "$DRY_RUN" = 1 ] && world_arg+=(--print --skip-files)
"$PYTHON" -m pretrain.config "$CONFIG" "${world_arg[@]}" "${overrides[@]}"

[ -n "$ENV_FILE" ] && export DS_ENV_FILE="$ENV_FILE" && echo "+ environment for all nodes: $ENV_FILE"
echo "+ ${cmd[*]}"
if [ "$DRY_RUN" = 1 ]; then exit 0; fi
exec "${cmd[@]}"
