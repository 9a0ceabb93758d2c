#!/bin/bash
# Each task prints one "TASK {json}" line with what Slurm told it, whether its node's name
# resolves, and its network: the IPv4 addresses it has and its network namespace (the inode of
# /proc/self/ns/net). The job's shape (--nodes/--ntasks) comes from the sbatch command line.
# Usage: sbatch [shape] env_probe.sh PYTHON
#SBATCH --job-name=env-probe
#SBATCH --time=2
set -eu
PY=$1
srun "$PY" -c '
import json, os, socket, sys
import psutil
e = os.environ
addrs = sorted(a.address for nic in psutil.net_if_addrs().values() for a in nic
               if a.family == socket.AF_INET)
print("TASK", json.dumps(dict(
    procid=int(e["SLURM_PROCID"]), nodeid=int(e["SLURM_NODEID"]), localid=int(e["SLURM_LOCALID"]),
    ntasks=int(e["SLURM_NTASKS"]), nnodes=int(e["SLURM_NNODES"]), node=e["SLURMD_NODENAME"],
    hostname=socket.gethostname(), node_addr=socket.gethostbyname(e["SLURMD_NODENAME"]),
    nodelist=e["SLURM_JOB_NODELIST"], python=sys.executable, addrs=addrs,
    netns=os.stat("/proc/self/ns/net").st_ino)), flush=True)
'
