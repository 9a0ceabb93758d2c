#!/bin/bash
# Two tasks on two nodes: the one on the second node serves TCP (each connection gets "pong"),
# the one on the first connects to it every 0.2 s (at most TIMEOUT s each) and appends one line
# per try to LOG, a file: "<unix time> ok" or "<unix time> fail: <error>", until the file STOP
# exists. The log is a file, not the job output: a cut link must not delay what the test reads.
# Usage: sbatch link_probe.sh PYTHON LOG STOP TIMEOUT
#SBATCH --job-name=link-probe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=5
set -eu
srun --kill-on-bad-exit=1 "$1" -c '
import os, socket, sys, time
from megatrain.dist import expand_nodelist, job_port
log, stop, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
e = os.environ
server, port = expand_nodelist(e["SLURM_JOB_NODELIST"])[1], job_port(e["SLURM_JOB_ID"])
if e["SLURM_PROCID"] == "1":
    srv = socket.create_server(("", port))
    srv.settimeout(0.5)
    while not os.path.exists(stop):
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        with conn:
            conn.sendall(b"pong")
    sys.exit(0)
with open(log, "a", buffering=1) as out:
    while not os.path.exists(stop):
        try:
            with socket.create_connection((server, port), timeout=timeout) as c:
                c.settimeout(timeout)
                what = "ok" if c.recv(4) == b"pong" else "fail: short reply"
            out.write(f"{time.time():.3f} {what}\n")
        except OSError as err:
            out.write(f"{time.time():.3f} fail: {type(err).__name__}: {err}\n")
        time.sleep(0.2)
' "$2" "$3" "$4"
