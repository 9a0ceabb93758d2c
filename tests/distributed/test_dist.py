"""The process group on 2 CPU processes (gloo): object collectives wait as long as rank 0 works
alone, whatever the default group's timeout."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port

pytestmark = pytest.mark.slow

SLOW_RANK0 = """
import datetime, time
from megatrain import dist
env = dist.DistEnv.from_environ()
dist.init_process_group(env, timeout=datetime.timedelta(seconds=3))
# rank 0 works alone for longer than the default group's timeout (a universal-checkpoint
# conversion of a large model outlasts NCCL's), the others wait in `agree`
print("RESULT", dist.agree(lambda: time.sleep(8) or "converted", root=0), flush=True)
dist.teardown()
"""


def test_waiting_for_rank_0_is_not_bounded_by_the_collective_timeout():
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SLOW_RANK0],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(r),
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "RESULT converted" in out, err[-3000:]
