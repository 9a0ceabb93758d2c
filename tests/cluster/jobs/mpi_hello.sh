#!/bin/bash
# MPI hello world: mpi4py on MPICH from PyPI, launched by srun through Slurm's PMI2.
# Usage: sbatch mpi_hello.sh PYTHON
#SBATCH --job-name=mpi-hello
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=2
set -eu
srun --mpi=pmi2 "$1" -c '
import os
from mpi4py import MPI
c = MPI.COMM_WORLD
total = c.allreduce(c.Get_rank() + 1)
lib = MPI.Get_library_version().split()[0]
node = os.environ["SLURMD_NODENAME"]
print(f"MPI rank={c.Get_rank()} size={c.Get_size()} node={node} sum={total} lib={lib}", flush=True)
'
