"""Who am I, the process group, and the few collectives megatrain needs.

- `DistEnv.from_environ()`: this process's rank, world size, local rank and launcher, from what
  torchrun, mpiexec (MPICH, Open MPI, PMIx), srun or a Slurm job array left in the environment.
  It is the only place that reads those variables; the trainer, the CLI and the prep use it.
- `rendezvous()`: MASTER_ADDR and MASTER_PORT (first host of the Slurm step, port from the job id).
- `init_process_group()`: NCCL on GPU, gloo on CPU, through DeepSpeed's communication layer.
- `all_reduce({"loss": x, "joules": j})`, `all_gather(obj)`, `barrier()`: identities when there is
  no process group, so the same code runs on one process.
- `agree(fn, comm)`: run a step that may fail on some ranks; if it failed anywhere, every rank
  raises, so that none waits forever in the next collective. The trainer (over torch.distributed)
  and the prep (over its own `Comm`: MPI or files) share it.

Nothing here imports torch or DeepSpeed at module level: `megatrain prep` uses `DistEnv` and
`agree` without them.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from megatrain.errors import MegatrainError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# What each launcher sets. Open MPI: OMPI_COMM_WORLD_*; MPICH's hydra and Slurm's pmi2: PMI_*
# (hydra adds MPI_LOCALRANKID/MPI_LOCALNRANKS); PMIx (Open MPI 5, srun --mpi=pmix): PMIX_RANK.
MPI_RANK = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
MPI_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
MPI_LOCAL_RANK = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
MPI_LOCAL_SIZE = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def _first(environ: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((environ[n] for n in names if environ.get(n, "") != ""), None)


@dataclass
class DistEnv:
    """Where this process stands in its job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "local"
    """`torchrun`, `mpi`, `srun`, `array` (Slurm job array tasks as ranks) or `local`."""

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] = os.environ, arrays_are_ranks: bool = False
    ) -> DistEnv:
        """Read the launcher's variables. `arrays_are_ranks`: the tasks of a Slurm job array are
        the ranks of one job (the prep's array mode); for training they are separate runs."""
        addr, port = rendezvous(environ)
        if "RANK" in environ and "WORLD_SIZE" in environ:
            rank, world, launcher = int(environ["RANK"]), int(environ["WORLD_SIZE"]), "torchrun"
        elif any(n in environ for n in (*MPI_RANK, *MPI_SIZE, "MPI_LOCALNRANKS")):
            rank = int(_first(environ, MPI_RANK) or 0)
            world = int(_first(environ, MPI_SIZE) or environ.get("SLURM_NTASKS") or 1)
            launcher = "mpi"
        elif arrays_are_ranks and "SLURM_ARRAY_TASK_ID" in environ:
            first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
            count = environ.get("SLURM_ARRAY_TASK_COUNT")
            world = int(count) if count else int(environ["SLURM_ARRAY_TASK_MAX"]) - first + 1
            rank, launcher = int(environ["SLURM_ARRAY_TASK_ID"]) - first, "array"
        elif "SLURM_STEP_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
            rank, world, launcher = (
                int(environ["SLURM_PROCID"]),
                int(environ["SLURM_NTASKS"]),
                "srun",
            )
        else:
            return cls(master_addr=addr, master_port=port)
        if launcher == "array":  # independent tasks, each alone on its node as far as we know
            return cls(rank, world, 0, 1, addr, port, launcher)
        local_rank = environ.get("LOCAL_RANK") or _first(environ, MPI_LOCAL_RANK)
        local_world = environ.get("LOCAL_WORLD_SIZE") or _first(environ, MPI_LOCAL_SIZE)
        if "SLURM_LOCALID" in environ:
            local_rank = local_rank or environ["SLURM_LOCALID"]
            # "4(x2)" or "4,2": tasks on each node; ours is the first entry on homogeneous jobs
            per_node = environ.get("SLURM_NTASKS_PER_NODE") or environ.get(
                "SLURM_TASKS_PER_NODE", ""
            )
            local_world = local_world or (per_node.split("(")[0].split(",")[0] or None)
        return cls(
            rank, world, int(local_rank or 0), int(local_world or world), addr, port, launcher
        )


# ----------------------------------------------------------------------------- rendezvous


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, expanded as `scontrol show hostnames` does:
    'node[1-3,5],gpu07' -> node1 node2 node3 node5 gpu07; 'r[1-2]i0n[08-09]' keeps zero padding."""
    groups = re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist)  # split on commas outside brackets
    hosts: list[str] = []
    for group in groups:
        names = [""]
        for part in re.split(r"(\[[^\]]*\])", group):
            choices = [part]
            if part.startswith("["):
                choices = []
                for item in part[1:-1].split(","):
                    lo, _, hi = item.partition("-")
                    choices += (
                        [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)] if hi else [lo]
                    )
            names = [n + c for n in names for c in choices]
        hosts += names
    return hosts


def slurm_job(environ: Mapping[str, str] = os.environ) -> dict | None:
    """This Slurm job's id and restart count ({"id": "123", "restart": 0}); None outside Slurm.
    A requeued job keeps its id and counts one more restart."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return None
    return {"id": job, "restart": int(environ.get("SLURM_RESTART_COUNT") or 0)}


def job_port(job_id: str | int) -> int:
    """A port derived from a job id, the same on every task of the job without talking; two jobs
    sharing a node do not collide. 10000-29999 stays below Linux's ephemeral ports (32768+)."""
    return 10000 + int(job_id) % 20000


def rendezvous(environ: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT for the process group. Set ones win (torchrun sets both); under
    srun the master is the first host of the step (rank 0 runs there) and the port comes from the
    job id."""
    addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not addr:
        addr = expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1"
    if not port:
        job = environ.get("SLURM_JOB_ID", "")
        port = str(job_port(job)) if job.isdigit() else "29500"
    return addr, int(port)


# ----------------------------------------------------------------------------- process group


def choose_gpu(local_rank: int, local_world_size: int, visible: int) -> int:
    """The index of this task's GPU among the `visible` ones. Either every task of the node sees
    all its GPUs (task i takes GPU i), or each task sees only its own (`--gpus-per-task=1`,
    `--gpu-bind`, per-task CUDA_VISIBLE_DEVICES: GPU 0). Two tasks never share a GPU."""
    if visible == 1:
        return 0
    if local_rank < visible and local_world_size <= visible:
        return local_rank
    raise MegatrainError(
        f"task {local_rank} of {local_world_size} on this node sees {visible} GPUs: start one task "
        "per GPU (e.g. `--ntasks-per-node` equal to `--gres=gpu:N`, or `--nproc` at most the GPUs "
        "you have), or give each task its own GPU (`--gpus-per-task=1`)"
    )


def device_for(env: DistEnv) -> torch.device:
    import torch

    if torch.cuda.is_available():
        index = choose_gpu(env.local_rank, env.local_world_size, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


# Object collectives (`all_gather`, `agree`) go through a gloo group whose timeout is this long,
# not NCCL's: rank 0 may work alone for a long time meanwhile (a universal-checkpoint conversion
# of a 7B model takes longer than NCCL's 30 minutes), and gloo notices a dead peer anyway.
OBJECT_TIMEOUT = timedelta(hours=12)
_objects = None  # the group of `all_gather`
RENDEZVOUS_TIMEOUT = timedelta(minutes=30)  # the least time ranks get to meet at start


def init_process_group(env: DistEnv, timeout: timedelta = timedelta(minutes=30)) -> torch.device:
    """Create the default process group (NCCL on GPU, gloo on CPU; collectives give up after
    `timeout`: `run.collective_timeout_s`) and hand it to DeepSpeed, whose engine needs its own
    view of it, and the gloo group of the object collectives; returns this process's device.
    MASTER_ADDR and MASTER_PORT come from `env` unless already set."""
    global _objects
    import torch
    import torch.distributed as dist

    device = device_for(env)
    if device.type == "cpu":
        # say so, rather than let DeepSpeed warn it guessed
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed 0.19 calls a torch.distributed function that torch 2.13 deprecates; nothing for
    # users to do
    warnings.filterwarnings(
        "ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning
    )
    import deepspeed
    from packaging.version import Version

    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    # DeepSpeed reads these from the environment, whichever launcher started us. LOCAL_RANK stays
    # the task's rank on its node (Open MPI's launcher checks it); DeepSpeed gets the device from
    # us (`device_id` here, `device_rank` in parallel.build_engine).
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank)
    )
    backend = "nccl" if device.type == "cuda" else "gloo"
    # NCCL aborts its communicators and raises when a collective fails or times out, so that a
    # dead peer is an error rather than a hang (torch's default only skips the clean-up)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # Binding the device makes NCCL set up at once; torch 2.6 < v < 2.7.1 hangs doing so (a torch
    # bug DeepSpeed also steps around), and a single rank has no peer to set up with.
    bind = device.type == "cuda" and env.world_size > 1
    bind = bind and not (
        Version("2.6.0") < Version(torch.__version__.split("+")[0]) < Version("2.7.1")
    )
    # The rendezvous first: its store lets a rank claim its GPU before NCCL, which refuses two
    # ranks on one GPU only deep in its set-up, with a message of its own.
    if env.world_size == 1:  # nobody to meet: no port to take (single-GPU jobs share nodes)
        store = dist.HashStore()
    else:
        # meeting waits for the slowest rank to start, however short the collectives' timeout
        meet = max(timeout, RENDEZVOUS_TIMEOUT)
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=meet))
    if device.type == "cuda":
        _claim_gpu(store, torch.cuda.get_device_properties(device).uuid, env.rank)
    dist.init_process_group(
        backend,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=device if bind else None,
    )
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    _objects = dist.new_group(backend="gloo", timeout=OBJECT_TIMEOUT)
    return device


def _claim_gpu(store, uuid, rank: int) -> None:
    """Count this rank on its GPU in the job's store; the second rank on one GPU stops, by name
    (the launcher then stops the others)."""
    import socket

    gpu = f"{socket.gethostname()}/GPU-{uuid}"
    if store.add(f"megatrain/gpu/{gpu}", 1) > 1:
        raise MegatrainError(
            f"rank {rank} found its GPU ({gpu}) taken by another rank: give every task its own "
            "GPU (one task per GPU, or `--gpus-per-task=1`)"
        )


def _initialized() -> bool:
    if "torch" not in sys.modules:  # nothing can have started a process group
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if not _initialized():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def teardown() -> None:
    """Wait for every rank, then destroy the process groups (after the last collective of a job)."""
    global _objects
    if _initialized():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        _objects = None


# ----------------------------------------------------------------------------- collectives


def all_reduce(values: Mapping[str, float], op: str = "sum") -> dict[str, float]:
    """Sum (or max) of named floats over all ranks, in one collective; every rank must pass the
    same names. Identity without a process group."""
    import torch

    names = sorted(values)
    t = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
    if _initialized():
        import torch.distributed as dist

        if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(names, t.tolist()))


def all_gather(value: T) -> list[T]:
    """One picklable value from every rank, in rank order."""
    if not _initialized():
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=_objects)
    return out


class Comm(Protocol):
    """What `agree` needs from a communicator: torch.distributed here, MPI or files in the prep."""

    rank: int
    size: int

    def allgather(self, obj: Any) -> list: ...


class ProcessGroupComm:
    """The default torch.distributed process group (or this process alone) as a `Comm`."""

    @property
    def rank(self) -> int:
        return rank_world()[0]

    @property
    def size(self) -> int:
        return rank_world()[1]

    def allgather(self, obj: Any) -> list:
        return all_gather(obj)


def agree(fn: Callable[[], T], comm: Comm | None = None, root: int | None = None) -> T:
    """Run `fn` on every rank (or only on rank `root`, whose result every rank then gets) and
    agree on the outcome: if it raised on any rank, every rank raises. The rank where it failed
    raises its own error; the others raise a copy of the first failure. The errors are marked
    `shared`: every rank knows, so only rank 0 needs to print, and none needs to abort the others.
    """
    comm = comm or ProcessGroupComm()
    result, error = None, None
    if root is None or comm.rank == root:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 -- handed to every rank, then raised
            error = e
    outcomes = comm.allgather((result if root is not None else None, _portable(error)))
    failures = [e for _, e in outcomes if e is not None]
    if failures:
        error = error or failures[0]
        error.shared = True
        raise error
    return outcomes[root][0] if root is not None else result


def _portable(error: Exception | None) -> Exception | None:
    """The error as it can travel to other ranks (pickled): itself, or a RuntimeError saying it."""
    if error is None:
        return None
    import pickle

    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 -- an exception type that does not pickle
        return RuntimeError(f"{type(error).__name__}: {error}")
