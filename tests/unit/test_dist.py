"""Who am I and where is the master: Slurm host lists, rendezvous, launcher variables, `agree`."""

import pytest

from megatrain import dist
from megatrain.dist import DistEnv
from megatrain.errors import MegatrainError


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("node[1-2]", ["node1", "node2"]),
        (
            "jean-zay-iam[01-03,07],jean-zay-a101",
            [
                "jean-zay-iam01",
                "jean-zay-iam02",
                "jean-zay-iam03",
                "jean-zay-iam07",
                "jean-zay-a101",
            ],
        ),
        ("r1i[0-1]n[8-9]", ["r1i0n8", "r1i0n9", "r1i1n8", "r1i1n9"]),
        ("gpu[008-010]", ["gpu008", "gpu009", "gpu010"]),
    ],
)
def test_expand_nodelist_like_scontrol_show_hostnames(nodelist, hosts):
    assert dist.expand_nodelist(nodelist) == hosts


def test_rendezvous_under_srun_uses_first_host_and_a_port_from_the_job_id():
    env = {
        "SLURM_JOB_NODELIST": "node[3-4]",
        "SLURM_STEP_NODELIST": "node[4-5]",
        "SLURM_JOB_ID": "1234567",
    }
    assert dist.rendezvous(env) == (
        "node4",
        10000 + 1234567 % 20000,
    )  # the step's first host: rank 0's
    assert dist.rendezvous({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"}) == (
        "10.0.0.1",
        6000,
    )
    assert dist.rendezvous({}) == ("127.0.0.1", 29500)
    ports = {dist.rendezvous({**env, "SLURM_JOB_ID": str(j)})[1] for j in range(1000, 1100)}
    assert len(ports) == 100 and all(10000 <= p < 30000 for p in ports)  # below the ephemeral range


def test_dist_env_from_srun_variables():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NODELIST": "jz[10-11]",
        "SLURM_JOB_ID": "42",
    }
    assert DistEnv.from_environ(env) == DistEnv(5, 8, 1, 4, "jz10", 10042, "srun")


@pytest.mark.parametrize(
    "env, expected",
    [
        # torchrun, also inside an srun step: its own variables win
        (
            {
                "RANK": "3",
                "WORLD_SIZE": "8",
                "LOCAL_RANK": "1",
                "LOCAL_WORLD_SIZE": "2",
                "SLURM_PROCID": "0",
                "SLURM_NTASKS": "4",
                "SLURM_STEP_ID": "0",
                "SLURM_LOCALID": "0",
            },
            (3, 8, 1, 2, "torchrun"),
        ),
        # Open MPI's mpirun
        (
            {
                "OMPI_COMM_WORLD_RANK": "5",
                "OMPI_COMM_WORLD_SIZE": "6",
                "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "3",
            },
            (5, 6, 2, 3, "mpi"),
        ),
        # MPICH's hydra (mpiexec)
        (
            {"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
            (1, 4, 1, 2, "mpi"),
        ),
        # srun --mpi=pmi2: PMI for the rank, Slurm for the node
        (
            {
                "PMI_RANK": "3",
                "PMI_SIZE": "4",
                "SLURM_PROCID": "3",
                "SLURM_NTASKS": "4",
                "SLURM_STEP_ID": "0",
                "SLURM_LOCALID": "1",
                "SLURM_TASKS_PER_NODE": "2(x2)",
            },
            (3, 4, 1, 2, "mpi"),
        ),
        # srun --mpi=pmix: no size variable of its own
        (
            {
                "PMIX_RANK": "2",
                "SLURM_NTASKS": "3",
                "SLURM_STEP_ID": "0",
                "SLURM_LOCALID": "0",
                "SLURM_TASKS_PER_NODE": "1(x3)",
            },
            (2, 3, 0, 1, "mpi"),
        ),
        # a one-task step is a single process, whatever --nproc then starts
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}, (0, 1, 0, 1, "local")),
        # a job array's tasks are separate trainings (a sweep)...
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (0, 1, 0, 1, "local")),
        ({}, (0, 1, 0, 1, "local")),
    ],
)
def test_every_launcher_is_recognized(env, expected):
    e = DistEnv.from_environ(env)
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.launcher) == expected


def test_job_array_tasks_are_the_ranks_of_a_prep():
    env = {
        "SLURM_ARRAY_JOB_ID": "70",
        "SLURM_ARRAY_TASK_ID": "12",
        "SLURM_ARRAY_TASK_MIN": "10",
        "SLURM_ARRAY_TASK_MAX": "13",
    }
    e = DistEnv.from_environ(env, arrays_are_ranks=True)
    assert (e.rank, e.world_size, e.launcher) == (2, 4, "array")
    e = DistEnv.from_environ({**env, "SLURM_ARRAY_TASK_COUNT": "4"}, arrays_are_ranks=True)
    assert (e.rank, e.world_size) == (2, 4)


class ThreadComm:
    """`size` ranks in threads of this process, exchanging through a shared table (the real
    communicators, torch.distributed and the prep's, are tested where they run)."""

    def __init__(self, size: int):
        import threading

        self.size, self.barrier, self.table = size, threading.Barrier(size), {}

    def rank_view(self, rank: int):
        comm = self

        class View:
            size = comm.size

            def __init__(self):
                self.rank = rank

            def allgather(self, obj):
                comm.table[rank] = obj
                comm.barrier.wait()
                out = [comm.table[r] for r in range(comm.size)]
                comm.barrier.wait()
                return out

        return View()


def run_ranks(size: int, fn):
    """fn(comm) on `size` ranks at once; each rank's result or raised error."""
    import threading

    comm, out = ThreadComm(size), {}

    def body(rank):
        try:
            out[rank] = fn(comm.rank_view(rank))
        except Exception as e:  # noqa: BLE001 -- compared below
            out[rank] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return [out[r] for r in range(size)]


class BadShard(Exception):
    pass


def test_agree_raises_on_every_rank_when_one_fails():
    def open_data(comm):
        def work():
            if comm.rank == 1:
                raise BadShard("shard-00001.arrow is corrupt")
            return f"data of rank {comm.rank}"

        return dist.agree(work, comm)

    r0, r1, r2 = run_ranks(3, open_data)
    assert all(
        isinstance(e, BadShard) and str(e) == "shard-00001.arrow is corrupt" for e in (r0, r1, r2)
    )
    assert r0.shared and r1.shared and r2.shared and r0 is not r1
    assert run_ranks(2, lambda comm: dist.agree(lambda: comm.rank, comm)) == [0, 1]


def test_agree_on_root_hands_its_result_or_its_error_to_all():
    assert (
        run_ranks(3, lambda comm: dist.agree(lambda: f"plan by {comm.rank}", comm, root=0))
        == ["plan by 0"] * 3
    )

    def fails_on_root(comm):
        def work():
            raise ValueError("no documents left")

        return dist.agree(work, comm, root=0)

    errors = run_ranks(2, fails_on_root)
    assert all(isinstance(e, ValueError) and e.shared for e in errors)


@pytest.mark.parametrize(
    "local_rank, local_world, visible, gpu",
    [
        (2, 4, 4, 2),  # every task sees the node's 4 GPUs: task i takes GPU i
        (3, 4, 1, 0),  # each task sees only its own (--gpus-per-task=1, per-task binding)
        (1, 2, 4, 1),  # fewer tasks than GPUs
        (0, 1, 1, 0),
    ],
)
def test_each_task_gets_its_own_gpu(local_rank, local_world, visible, gpu):
    assert dist.choose_gpu(local_rank, local_world, visible) == gpu


@pytest.mark.parametrize("local_rank, local_world, visible", [(4, 8, 4), (1, 3, 2)])
def test_more_tasks_than_gpus_is_refused_by_name(local_rank, local_world, visible):
    with pytest.raises(MegatrainError, match=f"sees {visible} GPUs: start one task per GPU"):
        dist.choose_gpu(local_rank, local_world, visible)
