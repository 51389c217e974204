#!/usr/bin/env bash
# One 1-SHUI study on SLURM: N nodes x M GPUs, one process per node (jax.distributed), or, in a
# job array written by launch/sweep.py, one study of the sweep per array task.
#
# Submit from the repository root, after `source launch/env.sh` once on the login node (it makes
# .venv; the compute nodes only use it):
#
#   sbatch launch/slurm.sh --config=configs/celebahq.py:N=20 --config.data.data_dir=/data
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm.sh --config=configs/celeba.py:N=10 \
#       --config.data.data_dir=/data --config.seed=1          # one study on 2 x 8 GPUs
#   python launch/sweep.py --mode=slurm --config.data.data_dir=/data   # writes <root>/submit.sh:
#   bash workdir/sweep/submit.sh    # = sbatch --array=0-K launch/slurm.sh --commands=FILE
#
# Arguments are those of `python -m oneshui_jax.main`. With --commands=FILE (first argument)
# and SLURM_ARRAY_TASK_ID set, the study is line SLURM_ARRAY_TASK_ID (0 first) of FILE, one
# study's arguments per line, shell-quoted as launch/sweep.py writes them; the remaining
# arguments are added after it.
#
# Every node runs `srun python -m oneshui_jax.main --distributed --coordinator_address=HOST:PORT
# --num_processes=$SLURM_NNODES --process_id=$SLURM_PROCID ...`: process 0 runs on the first
# host of the allocation (`scontrol show hostnames`), on port ONESHUI_COORDINATOR_PORT (default
# 20000 + job id mod 20000, so two jobs sharing a node do not collide). jax.distributed would
# read the same values from SLURM_* itself; they are given explicitly so that the log shows them.
# Environment: ONESHUI_PYTHON (default .venv/bin/python of the repository).
#
#SBATCH --job-name=oneshui
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

ROOT="${ONESHUI_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$ROOT"
if [ ! -f oneshui_jax/main.py ]; then
  echo "error: $ROOT is not the repository root (no oneshui_jax/main.py); submit from it or set ONESHUI_ROOT" >&2
  exit 2
fi
PY="${ONESHUI_PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "error: $PY not found; run 'source launch/env.sh' once in $ROOT before submitting (or set ONESHUI_PYTHON)" >&2
  exit 2
fi

args=()
case "${1:-}" in
  --commands=*) commands="${1#--commands=}"; shift ;;
  --commands) commands="${2:?--commands needs a file}"; shift 2 ;;
  *) commands="" ;;
esac
if [ -n "$commands" ]; then
  if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    echo "error: --commands=$commands needs SLURM_ARRAY_TASK_ID; submit with sbatch --array=0-K" >&2
    exit 2
  fi
  line="$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$commands")"
  if [ -z "$line" ]; then
    echo "error: $commands has no line $SLURM_ARRAY_TASK_ID (array task ids count from 0)" >&2
    exit 2
  fi
  # The line was written by launch/sweep.py with shlex quoting: let the shell split it back.
  eval "args=($line)"
fi
args+=("$@")

if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # no pipe: pipefail
  host="${hosts[0]}"
else
  host="$(hostname)"
fi
port="${ONESHUI_COORDINATOR_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
nodes="${SLURM_NNODES:-1}"
echo "[slurm.sh] job ${SLURM_JOB_ID:-?} task ${SLURM_ARRAY_TASK_ID:--}: $nodes node(s), coordinator $host:$port" >&2
echo "[slurm.sh] python -m oneshui_jax.main ${args[*]}" >&2

# One task per node; each gets its process id from its own SLURM_PROCID.
exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \
  'exec "$0" -m oneshui_jax.main --distributed --coordinator_address="$1" --num_processes="$2" --process_id="$SLURM_PROCID" "${@:3}"' \
  "$PY" "$host:$port" "$nodes" "${args[@]}"
