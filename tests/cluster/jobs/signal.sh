#!/bin/bash
# With B:, Slurm signals only this batch shell, ahead of the time limit (the pattern a
# training script uses to checkpoint and requeue). Slurm checks limits periodically, so
# the signal may come up to ~60 s earlier than asked. Without it the job would TIMEOUT.
#SBATCH --job-name=signal
#SBATCH --time=1
#SBATCH --signal=B:USR1@50
trap 'echo "got USR1 after $SECONDS s"; kill "$sleeper"; exit 0' USR1
sleep 300 &           # in the background: bash runs a trap only between commands,
sleeper=$!            # and `wait` returns as soon as a trapped signal arrives
wait "$sleeper"
echo "no signal"
exit 1
