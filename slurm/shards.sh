#!/usr/bin/env bash
# shards.sh: build WebDataset shards as a Slurm array job, one disjoint part per array task, then
# merge the parts' indexes in a job that waits for every task to succeed.
#
# Usage (from the repository root; the log folder must exist before sbatch opens it):
#   mkdir -p runs/slurm
#   jid=$(sbatch --parsable --array=0-15 slurm/shards.sh build \
#           --kind voxceleb --source /data/voxceleb --out /data/shards/vox [build args...])
#   sbatch --dependency=afterok:$jid --job-name=s2f-merge --output='runs/slurm/%x-%j.out' \
#          slurm/shards.sh merge /data/shards/vox
#
# build ARGS: each array task runs
#     s2f shards build ARGS --part $SLURM_ARRAY_TASK_ID --parts $SLURM_ARRAY_TASK_COUNT
#                           --workers $SLURM_CPUS_PER_TASK
#   Items go to parts by a stable hash of their key and each part names its shards and failures
#   file by part, so tasks never collide. Array ids must be 0..N-1 (e.g. --array=0-15, or
#   --array=0-15%4 to run at most 4 at once). A rerun or requeued task skips items already in
#   its complete shards. Pass --workers yourself to override the cpus-per-task default.
# merge OUT: runs `s2f shards merge OUT` (split indexes from all parts), as a plain job; give it
#   its own --output, the default one is named for array tasks.
#   afterok on an array job id waits for all of its tasks; if one failed, the merge job never
#   starts (squeue shows DependencyNeverSatisfied): scancel it, rerun the failed task with the
#   part count given explicitly, then submit the merge again:
#     S2F_SHARDS_PARTS=16 sbatch --parsable --array=7 slurm/shards.sh build ...same args...
#
# Environment (all optional):
#   S2F_SHARDS_CMD    command replacing `s2f shards` (word-split)         [s2f shards]
#   S2F_SHARDS_PARTS  number of parts, for reruns of single tasks   [SLURM_ARRAY_TASK_COUNT]
#
#SBATCH --job-name=s2f-shards
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%A_%a.out
set -euo pipefail

die() {
  echo "shards.sh: error: $*" >&2
  exit 2
}

[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job; submit it: sbatch --array=0-N slurm/shards.sh build ARGS"
[[ $# -ge 1 ]] || die "usage: shards.sh build BUILD_ARGS... | shards.sh merge OUT"
cd "${SLURM_SUBMIT_DIR:?}"

if [[ -n ${S2F_SHARDS_CMD:-} ]]; then
  read -r -a CMD <<<"$S2F_SHARDS_CMD"
elif command -v s2f >/dev/null; then
  CMD=(s2f shards)
elif [[ -x $PWD/.venv/bin/s2f ]]; then
  CMD=("$PWD/.venv/bin/s2f" shards)
else
  die "no 's2f' on PATH nor in $PWD/.venv/bin; activate the environment (make install) or set S2F_SHARDS_CMD"
fi

# The part numbers must cover 0..parts-1 exactly, or some items would never be built.
array_parts() {
  [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] || die "build runs as an array job: sbatch --array=0-N slurm/shards.sh build ..."
  local parts=${S2F_SHARDS_PARTS:-${SLURM_ARRAY_TASK_COUNT:?}}
  if [[ -z ${S2F_SHARDS_PARTS:-} ]]; then
    ((${SLURM_ARRAY_TASK_MIN:?} == 0 && ${SLURM_ARRAY_TASK_MAX:?} == parts - 1)) ||
      die "array ids must be 0..N-1 with step 1 (got $SLURM_ARRAY_TASK_MIN..$SLURM_ARRAY_TASK_MAX, $parts tasks); rerunning single tasks? set S2F_SHARDS_PARTS"
  fi
  ((SLURM_ARRAY_TASK_ID < parts)) || die "task $SLURM_ARRAY_TASK_ID is outside parts 0..$((parts - 1))"
  echo "$parts"
}

mode=$1
shift
case $mode in
  build)
    parts=$(array_parts)
    workers=()
    [[ " $* " == *" --workers"* ]] || workers=(--workers "${SLURM_CPUS_PER_TASK:-1}")
    echo "shards.sh: job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}: part $SLURM_ARRAY_TASK_ID of $parts at $(date -Is)"
    exec "${CMD[@]}" build "$@" --part "$SLURM_ARRAY_TASK_ID" --parts "$parts" "${workers[@]}"
    ;;
  merge)
    [[ $# -eq 1 ]] || die "usage: shards.sh merge OUT"
    [[ -z ${SLURM_ARRAY_TASK_ID:-} ]] || die "merge once, not as an array: sbatch --dependency=afterok:JOBID slurm/shards.sh merge OUT"
    echo "shards.sh: job $SLURM_JOB_ID: merging $1 at $(date -Is)"
    exec "${CMD[@]}" merge "$1"
    ;;
  *) die "unknown mode '$mode'; usage: shards.sh build BUILD_ARGS... | shards.sh merge OUT" ;;
esac
