#!/bin/bash
# A gloo process group across the job's tasks, met at MASTER_ADDR = the first node of the job
# (megatrain.dist.rendezvous, as slurm/pretrain.sh does), one all_reduce; then each task prints
# one "GLOO {json}" line: its rank, the sum, and the TCP connections it holds (local and remote
# address), so a test sees which interfaces the traffic crossed.
# Usage: sbatch [shape] gloo_probe.sh PYTHON
#SBATCH --job-name=gloo-probe
#SBATCH --time=3
set -eu
srun "$1" -c '
import json, os
from datetime import timedelta
import psutil, torch, torch.distributed as dist
from megatrain.dist import rendezvous
e = os.environ
addr, port = rendezvous()
rank, world = int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank,
                        world_size=world, timeout=timedelta(seconds=60))
x = torch.tensor([rank + 1.0])
dist.all_reduce(x)
conns = sorted({(c.laddr.ip, c.raddr.ip, c.raddr.port == port)
                for c in psutil.Process().net_connections("tcp") if c.raddr})
print("GLOO", json.dumps(dict(rank=rank, node=e["SLURMD_NODENAME"], master=addr,
                               sum=x.item(), conns=conns)), flush=True)
dist.barrier()
dist.destroy_process_group()
'
