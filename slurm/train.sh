#!/usr/bin/env bash
# train.sh: train s2f under Slurm on one or many nodes, with preemption-safe auto-requeue.
#
# Usage (from the repository root; the log folder must exist before sbatch opens it):
#   mkdir -p runs/slurm
#   sbatch [sbatch options] slurm/train.sh CONFIG [extra `s2f fit` args...]
#
# Examples:
#   sbatch slurm/train.sh configs/paper.yaml                                  # 1 node, 1 task
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 slurm/train.sh configs/paper.yaml
#   sbatch --ntasks-per-node=2 --cpus-per-task=1 slurm/train.sh configs/demo.yaml  # CPU DDP
#   sbatch slurm/train.sh configs/demo.yaml --trainer.max_steps=2000            # extra fit args
#
# One Slurm task is one training process (one GPU): --ntasks-per-node must equal the GPUs used
# per node. Give --ntasks-per-node, never plain --ntasks: Lightning checks the per-node count.
# GPUs are not requested by default (CPU-only clusters exist); add --gpus-per-node=N. The
# accelerator follows what Slurm granted (SLURM_GPUS_ON_NODE); on clusters that expose GPUs
# without gres, pass --trainer.accelerator=gpu as an extra argument.
#
# What runs, on every task:
#   srun $S2F_CMD --config CONFIG --trainer.num_nodes=$SLURM_NNODES
#        --trainer.devices=$SLURM_NTASKS_PER_NODE --trainer.accelerator=gpu|cpu
#        --trainer.default_root_dir=RUN_DIR "$@"
# Extra arguments come last, so they override anything set here.
#
# Run directory: runs/<config stem>-<job id> under the submit folder. A requeued job keeps its
# job id, so it lands in the same folder and `s2f fit` resumes from the newest checkpoint there.
#
# Preemption: --signal=USR1@120 sends SIGUSR1 to the training processes 120 s before the time
# limit; every rank saves RUN_DIR/checkpoints/requeue-step<N>.ckpt together at the next step
# boundary and rank 0 runs `scontrol requeue` (callbacks/requeue.py). To try the
# same path on a running job: `scancel --signal=USR1 JOBID` (signals the tasks, not this shell;
# --batch works too: this shell is `exec srun`, which forwards signals to its tasks).
#
# Environment (all optional):
#   S2F_CMD       command replacing `s2f fit` (word-split), e.g.
#                 S2F_CMD="python -m s2f fit"                                   [s2f fit]
#   S2F_RUN_DIR   run directory instead of runs/<config stem>-<job id>
#   MASTER_PORT   rendezvous port                           [15000 + last 4 digits of job id]
#   WANDB_MODE    set to `offline` here when WANDB_API_KEY is unset, so init never blocks
#   WANDB_RUN_ID  W&B run id, stable across requeues        [<run dir name>]; WANDB_RESUME=allow
#
#SBATCH --job-name=s2f-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out
set -euo pipefail

die() {
  echo "train.sh: error: $*" >&2
  exit 2
}

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job; submit it: sbatch slurm/train.sh CONFIG [args...]"
[[ $# -ge 1 ]] || die "usage: sbatch slurm/train.sh CONFIG [extra s2f fit args...]"
[[ -n ${SLURM_NTASKS_PER_NODE:-} ]] ||
  die "SLURM_NTASKS_PER_NODE is unset: request tasks with --ntasks-per-node=N (one per GPU), not --ntasks"

# sbatch runs this script from a copy in the spool folder; relative paths mean the submit folder.
cd "${SLURM_SUBMIT_DIR:?}"

CONFIG=$1
shift
[[ -f $CONFIG ]] || die "config '$CONFIG' not found (relative to $PWD)"

stem=$(basename "$CONFIG")
stem=${stem%.*}
RUN_DIR=${S2F_RUN_DIR:-$PWD/runs/$stem-$SLURM_JOB_ID}
mkdir -p "$RUN_DIR"

# The training command: S2F_CMD, or `s2f fit` from PATH or from this checkout's venv.
if [[ -n ${S2F_CMD:-} ]]; then
  read -r -a CMD <<<"$S2F_CMD"
elif command -v s2f >/dev/null; then
  CMD=(s2f fit)
elif [[ -x $PWD/.venv/bin/s2f ]]; then
  CMD=("$PWD/.venv/bin/s2f" fit)
else
  die "no 's2f' on PATH nor in $PWD/.venv/bin; activate the environment (make install) or set S2F_CMD"
fi

# GPUs on this node as Slurm granted them (gres); none means a CPU run with gloo DDP.
gpus=${SLURM_GPUS_ON_NODE:-0}
if ((gpus > 0)); then
  accelerator=gpu
  ((gpus == SLURM_NTASKS_PER_NODE)) ||
    echo "train.sh: warning: $gpus GPUs per node but $SLURM_NTASKS_PER_NODE tasks per node; one task drives one GPU" >&2
else
  accelerator=cpu
fi

# Lightning's SLURMEnvironment reads SLURM_NTASKS/PROCID/LOCALID/NODEID itself; the rendezvous
# address and port are set here so every task (and the log) agrees on them.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 10000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
# Without an API key W&B would try the network and block for minutes; log offline instead.
if [[ -z ${WANDB_API_KEY:-} && -z ${WANDB_MODE:-} ]]; then
  export WANDB_MODE=offline
fi
# One W&B run per run directory, continued (not duplicated) after each requeue.
export WANDB_RUN_ID=${WANDB_RUN_ID:-$(basename "$RUN_DIR")}
export WANDB_RESUME=${WANDB_RESUME:-allow}

ARGS=(
  --config "$CONFIG"
  --trainer.num_nodes="$SLURM_NNODES"
  --trainer.devices="$SLURM_NTASKS_PER_NODE"
  --trainer.accelerator="$accelerator"
  --trainer.default_root_dir="$RUN_DIR"
)

echo "train.sh: job $SLURM_JOB_ID start $((${SLURM_RESTART_COUNT:-0} + 1)) (restart count ${SLURM_RESTART_COUNT:-0}) at $(date -Is)"
echo "train.sh: nodes $SLURM_JOB_NODELIST x $SLURM_NTASKS_PER_NODE tasks, accelerator $accelerator, master $MASTER_ADDR:$MASTER_PORT"
echo "train.sh: run dir $RUN_DIR"
echo "train.sh: ${CMD[*]} ${ARGS[*]} $*"

# exec: the batch shell becomes srun, which forwards signals it gets (e.g. --signal=B:USR1@N)
# to the tasks; --signal=USR1@N reaches the tasks directly. srun no longer inherits
# --cpus-per-task from sbatch (Slurm 22.05), so it is passed on explicitly.
exec srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
  "${CMD[@]}" "${ARGS[@]}" "$@"
