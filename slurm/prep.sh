#!/bin/bash
# megatrain prep on Jean Zay CPU nodes: one MPI rank per physical core, under srun.
#
#   sbatch -A abc@cpu slurm/prep.sh RAW_DIR --out DATA_DIR --recipe configs/data/fr-en.yaml
#   sbatch -A abc@cpu --nodes=4 slurm/prep.sh RAW_DIR --out DATA_DIR ...   # 160 ranks
#
# Arguments are those of `megatrain prep`. The output (and its .prep-work/) must be on a
# filesystem every node sees ($SCRATCH or $WORK on Jean Zay). Rerun the same command after a
# timeout or a crash: finished units are kept and the result is byte-identical.
#
# As a job array instead of MPI (tasks may then start at different times, but must all be able
# to run at once): sbatch -A abc@cpu --array=0-7 --ntasks=1 --cpus-per-task=1 slurm/prep.sh ...
#
# Environment: MEGATRAIN_SETUP is eval'ed first (default: nothing), e.g.
#   MEGATRAIN_SETUP='module purge; module load python/3.11.5; source ~/venvs/megatrain/bin/activate'
# MEGATRAIN_PYTHON is the Python that has megatrain, mpi4py and an MPI (default: python).
#SBATCH --job-name=megatrain-prep
#SBATCH --account=proj@cpu
#SBATCH --partition=cpu_p1
#SBATCH --qos=qos_cpu-t3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=40
#SBATCH --cpus-per-task=1
#SBATCH --hint=nomultithread
#SBATCH --time=20:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.out
set -euo pipefail

if [ -n "${MEGATRAIN_SETUP:-}" ]; then eval "$MEGATRAIN_SETUP"; fi
PYTHON=${MEGATRAIN_PYTHON:-python}
export OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export MEGATRAIN_PROGRESS_S=${MEGATRAIN_PROGRESS_S:-60}   # a progress line per minute in the log

echo "megatrain prep: job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}, $(date -Is)"
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    # one task per array element; the tasks meet through files in DATA_DIR/.prep-work
    exec "$PYTHON" -m megatrain.cli prep "$@"
fi
# --kill-on-bad-exit: if one rank dies, stop the others instead of leaving them waiting
srun --mpi=pmi2 --kill-on-bad-exit=1 "$PYTHON" -m megatrain.cli prep "$@"
