#!/bin/bash
# Requeues itself on its first run; the second run (SLURM_RESTART_COUNT=1) finishes.
# --open-mode=append keeps the first run's lines in the output (default: truncate).
#SBATCH --job-name=requeue
#SBATCH --time=2
#SBATCH --requeue
#SBATCH --open-mode=append
echo "run restart_count=${SLURM_RESTART_COUNT:-0}"
if [ -z "${SLURM_RESTART_COUNT:-}" ]; then
  scontrol requeue "$SLURM_JOB_ID"
  sleep 60            # the requeue kills us here
  echo "NOT KILLED"
  exit 1
fi
echo "second run done"
