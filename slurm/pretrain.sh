#!/bin/bash
# =============================================================================================
# megatrain: pretrain a GPT-style model with Slurm, on 1 node or many, for as many jobs as it takes.
#
#   sbatch [sbatch options] slurm/pretrain.sh CONFIG [key=value ...]
#
# CONFIG and the key=value overrides go to `megatrain train` unchanged (docs/config.md lists
# every key). Options given to sbatch override the #SBATCH lines below, so one script serves
# every partition. On Jean Zay (replace xyz by your project; `idrproj` lists yours):
#
#   # 2 nodes x 4 H100, 20 h jobs:
#   sbatch -A xyz@h100 -C h100 --qos=qos_gpu_h100-t3 --nodes=2 --ntasks-per-node=4 --gres=gpu:4 \
#          --cpus-per-task=24 slurm/pretrain.sh configs/my-run.yaml
#   # 4 nodes x 8 A100:
#   sbatch -A xyz@a100 -C a100 --qos=qos_gpu_a100-t3 --nodes=4 --ntasks-per-node=8 --gres=gpu:8 \
#          --cpus-per-task=8 slurm/pretrain.sh configs/my-run.yaml
#   # 1 node x 4 V100 32 GB, a 2-hour test on the dev QoS, fp16 (V100 has no bf16):
#   sbatch -A xyz@v100 -C v100-32g --qos=qos_gpu-dev --time=2:00:00 --ntasks-per-node=4 --gres=gpu:4 \
#          --cpus-per-task=10 slurm/pretrain.sh configs/my-run.yaml precision=fp16
#
# The same values live in configs/clusters/jean-zay-*.yaml, which `megatrain submit` reads to
# do all of this from Python (submitit) instead. On any other Slurm cluster: the same flags with
# your cluster's names; on the CPU test cluster of tests/cluster, `--nodes=2 --ntasks-per-node=1`.
#
# The life of a run: each job trains until Slurm warns it of the time limit (--signal below),
# saves a checkpoint, requeues itself (`scontrol requeue`: same job id, SLURM_RESTART_COUNT+1)
# and stops; the requeued job resumes from that checkpoint with the losses an uninterrupted
# run would have had. A run of many 20-hour jobs needs nobody, up to `run.max_restarts`.
# A crash (a rank's error or death, a hang the watchdog stops) requeues the job the same way when
# the run saved a checkpoint since the job started (`megatrain recover` below); two crashes in a
# row without a new checkpoint stop the chain with the reason.
# Follow it with:
#   squeue -u $USER                         pending / running
#   tail -f megatrain-<jobid>.out           every job of the run appends to the same file
#   sacct -j <jobid> --duplicates           one line per job of the run
#   RUN_DIR/events.jsonl                    checkpoints, stops, requeues, resumes (one JSON per line)
# `scancel <jobid>` ends the run for good: the trainer saves a checkpoint if Slurm's KillWait
# gives it time, and does not requeue a cancelled job. Resume it later with the same sbatch line.
# =============================================================================================

#SBATCH --job-name=megatrain
#SBATCH --nodes=1
# One Slurm task per GPU, started by `srun` below: set it to the node's GPUs (4 on Jean Zay V100
# and H100 nodes, 8 on A100 nodes) together with --gres=gpu:N and --cpus-per-task (the node's
# cores / its GPUs: 10 on V100, 8 on A100, 24 on H100). Change the shape with --nodes and
# --ntasks-per-node (not --ntasks, which would contradict the line below).
#SBATCH --ntasks-per-node=1
##SBATCH --gres=gpu:4
##SBATCH --cpus-per-task=24
# Slurm's "multithread" means hyperthreads: one task thread per physical core is faster here.
#SBATCH --hint=nomultithread
# Each job's limit; the run spans as many jobs as it needs. 20 h is the t3 QoS maximum on Jean Zay.
#SBATCH --time=20:00:00
# Warn the trainer 300 s before the time limit, so that it finishes its step and saves a
# checkpoint (raise it if your checkpoints take longer: events.jsonl shows when each was written).
# Without "B:", Slurm sends SIGUSR1 to every task of the running srun step (every trainer rank)
# and not to this batch shell; each rank records it, the ranks agree after the current step,
# save together, and rank 0 requeues the job. With "B:USR1@300" only this shell would get it, and
# it would have to trap it and forward it to srun: bash runs a trap only after the foreground
# command returns, so srun would have to run in the background with `wait`, one more thing to
# get wrong. slurmctld checks limits every 30 s and warns once fewer than N + 30 s remain: the
# warning comes up to a minute early, and only once (lost if no srun step runs at that moment).
# (NCCL 2.12 alone swallowed SIGUSR1; with it, use --signal=USR2@300: megatrain takes either.)
#SBATCH --signal=USR1@300
# May be requeued; append to the output files across the jobs of a run instead of truncating.
#SBATCH --requeue
#SBATCH --open-mode=append
# %x = job name, %j = job id (the same in every requeued job of the run).
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err

set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch [sbatch options] slurm/pretrain.sh CONFIG [key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift

# ---- software ---------------------------------------------------------------------------------
# Jobs start with the environment of the shell that ran sbatch. To be independent of it, set the
# environment here. On Jean Zay (configs/clusters/jean-zay-*.yaml has the modules per partition):
#   module purge
#   module load arch/h100                 # arch/a100 on A100 nodes, nothing on V100 nodes
#   module load pytorch-gpu/py3/2.7.0
#   export PYTHONUSERBASE=$WORK/.local_h100   # where `pip install --user -e .` put megatrain
# Elsewhere, e.g. the repository's virtual environment:
#   source "$SLURM_SUBMIT_DIR/.venv/bin/activate"

# Compute nodes have no internet: W&B writes RUN_DIR/wandb/offline-run-* and you sync from a
# login node with `wandb sync RUN_DIR/wandb/offline-run-*`. WANDB_MODE=online sbatch ... to override.
export WANDB_MODE=${WANDB_MODE:-offline}
# DeepSpeed compiles a small op the first time; on a shared filesystem every node and every
# requeued job reuses it.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$SLURM_SUBMIT_DIR/.cache/torch_extensions}
# Threads per task = the cores Slurm gave it. Since Slurm 22.05 srun no longer inherits sbatch's
# --cpus-per-task: without SRUN_CPUS_PER_TASK every task would get a single core.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}

echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s)" \
     "$SLURM_JOB_NODELIST, $SLURM_NTASKS task(s): megatrain train $CONFIG $*"

# ---- training ---------------------------------------------------------------------------------
# Plain srun: it starts SLURM_NTASKS copies of the trainer, one per GPU. Each derives its place
# from Slurm's variables (rank SLURM_PROCID, world SLURM_NTASKS, local rank SLURM_LOCALID, GPU =
# local rank) and the rendezvous from the allocation: MASTER_ADDR = the first host of the node
# list (`scontrol show hostnames $SLURM_JOB_NODELIST | head -1`), MASTER_PORT = 10000 + job id
# % 20000, so no two jobs sharing a node collide. Export MASTER_ADDR/MASTER_PORT to override.
# --kill-on-bad-exit: if one rank crashes, stop the others instead of leaving them waiting in a
# collective until a timeout (a rank that hangs stops itself: run.hang_timeout_s, exit 3).
status=0
srun --kill-on-bad-exit=1 python -u -m megatrain.cli train "$CONFIG" "wandb.mode=$WANDB_MODE" "$@" || status=$?
# After a time-limit requeue Slurm kills this job before it gets here; the requeued job starts
# from the top.
echo "$(date -Is) job $SLURM_JOB_ID: srun exited with status $status"
# After a crash (a rank's error, a killed rank, a hang): requeue the job if the run saved a
# checkpoint since this job started, or once if not; a second crash in a row without progress,
# or run.max_restarts, stops the chain (the reason is in RUN_DIR/events.jsonl and below).
if [ "$status" -ne 0 ]; then
  python -u -m megatrain.cli recover "$CONFIG" "$@" --exit-status "$status" || true
fi
exit $status
