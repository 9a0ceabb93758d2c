"""Launch plumbing without a cluster: Slurm host lists, rendezvous, requeue rules, cluster profiles, sbatch options."""

import json
import os
import signal

import pytest

from megatrain import hardware, launch
from megatrain.cli import main
from megatrain.config import ConfigError, configs_root, load_cluster
from megatrain.parallel import DistEnv
from megatrain.shards import ShardError

PROFILES = sorted(p.stem for p in (configs_root() / "clusters").glob("*.yaml"))


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
    assert launch.expand_nodelist(nodelist) == hosts


def test_rendezvous_under_srun_uses_first_host_and_a_port_from_the_job_id():
    env = {
        "SLURM_JOB_NODELIST": "node[3-4]",
        "SLURM_STEP_NODELIST": "node[4-5]",
        "SLURM_JOB_ID": "1234567",
    }
    assert launch.rendezvous(env) == (
        "node4",
        10000 + 1234567 % 20000,
    )  # the step's first host: rank 0's
    assert launch.rendezvous({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"}) == (
        "10.0.0.1",
        6000,
    )
    assert launch.rendezvous({}) == ("127.0.0.1", 29500)
    ports = {launch.rendezvous({**env, "SLURM_JOB_ID": str(j)})[1] for j in range(1000, 1100)}
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
    assert DistEnv.from_environ(env) == DistEnv(5, 8, 1, 4, "jz10", 10042)


@pytest.mark.parametrize(
    "sig, restarts, cap, state, ok, why",
    [
        ("SIGUSR1", 0, 100, "RUNNING", True, "SIGUSR1 before the time limit"),
        ("SIGUSR2", 3, 3, "RUNNING", False, "restart cap reached"),
        (
            "SIGTERM",
            0,
            100,
            "CANCELLED",
            False,
            "state CANCELLED",
        ),  # a user's scancel stays a cancel
        ("SIGTERM", 0, 100, "COMPLETING", False, "state COMPLETING"),
        ("SIGTERM", 0, 100, "RUNNING", True, "SIGTERM"),  # clusters that warn with SIGTERM alone
    ],
)
def test_requeue_decision(sig, restarts, cap, state, ok, why):
    decision, reason = launch.requeue_decision(sig, restarts, cap, state)
    assert decision is ok and why in reason


@pytest.mark.parametrize(
    "text, minutes",
    [
        ("90", 90),
        ("20:00:00", 1200),
        ("1:30:01", 91),
        ("30:00", 30),
        ("1-00:00:00", 1440),
        ("2-12", 3600),
    ],
)
def test_parse_slurm_time(text, minutes):
    assert launch.parse_slurm_time(text) == minutes


@pytest.fixture
def stop_state(monkeypatch):
    """Fresh signal state, and the test process's own handlers back afterwards."""
    saved = {s: signal.getsignal(s) for s in launch.STOP_SIGNALS}
    monkeypatch.setattr(launch, "_received", None)
    monkeypatch.setattr(launch, "_agreed", None)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_stop_signal_is_recorded_not_fatal(stop_state):
    stop = launch.StopRequest()
    # the trainer sums every rank's votes in its per-step all-reduce; one process here
    assert stop.signal is None and not stop.agree(stop.votes()) and launch.stop_signal() is None
    os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
    os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
    assert (
        stop.signal == "SIGUSR1" and stop.agree(stop.votes()) and launch.stop_signal() == "SIGUSR1"
    )


@pytest.mark.parametrize("name", PROFILES)
def test_every_cluster_profile_loads_and_is_consistent(name):
    p = load_cluster(name)
    assert p.accelerator == "cpu" or p.accelerator in hardware.ACCELERATORS, p.accelerator
    assert p.pue >= 1 and 0 < p.carbon_intensity_g_per_kwh < 1000
    if p.gpus_per_node:  # one task per GPU, each with its share of the node's cores
        assert p.slurm.cpus_per_task * p.gpus_per_node == p.cpus_per_node
        assert set(p.slurm.qos) == set(p.slurm.qos_max_hours) and p.slurm.default_qos in p.slurm.qos


@pytest.mark.parametrize(
    "name, constraint, gpus, cpus, qos, arch",
    [
        ("jean-zay-v100", "v100-32g", 4, 10, "qos_gpu-t3", None),
        ("jean-zay-a100", "a100", 8, 8, "qos_gpu_a100-t3", "arch/a100"),
        ("jean-zay-h100", "h100", 4, 24, "qos_gpu_h100-t3", "arch/h100"),
    ],
)
def test_jean_zay_sbatch_options(name, constraint, gpus, cpus, qos, arch):
    p = load_cluster(name)
    params = launch.slurm_parameters(p, nodes=2, time_min=1200, account="xyz")
    assert (
        params["constraint"],
        params["gres"],
        params["ntasks_per_node"],
        params["cpus_per_task"],
    ) == (constraint, f"gpu:{gpus}", gpus, cpus)
    assert params["qos"] == qos and params["account"] == "xyz@" + name.split("-")[-1]
    assert params["additional_parameters"] == {"requeue": True, "hint": "nomultithread"}
    assert params["setup"][0] == "module purge" and any(
        "pytorch-gpu/py3/" in line for line in params["setup"]
    )
    assert (
        (f"module load {arch}" in params["setup"])
        if arch
        else not any("arch/" in s for s in params["setup"])
    )
    assert (
        launch.slurm_parameters(p, account="xyz@" + name.split("-")[-1])["account"].count("@") == 1
    )


def test_qos_follows_the_time_asked():
    s = load_cluster("jean-zay-h100").slurm
    assert launch.choose_qos(s, None, 20 * 60) == "qos_gpu_h100-t3"
    assert launch.choose_qos(s, None, 50 * 60) == "qos_gpu_h100-t4"  # longer than t3 allows
    assert launch.choose_qos(s, "dev", 60) == "qos_gpu_h100-dev"
    assert (
        launch.choose_qos(s, "qos_gpu_h100-gc", 60) == "qos_gpu_h100-gc"
    )  # full names pass through
    with pytest.raises(ConfigError, match="fits no QoS"):
        launch.choose_qos(s, None, 101 * 60)
    assert launch.choose_qos(load_cluster("local").slurm, None, 10) is None


def test_submit_dry_run_prints_the_slurm_options(tiny_dataset, capsys):
    assert (
        main(
            [
                "submit",
                "configs/tiny.yaml",
                f"data.sources.0.path={tiny_dataset}",
                "--cluster",
                "jean-zay-h100",
                "--nodes",
                "4",
                "--account",
                "xyz",
                "--time",
                "2:00:00",
                "--qos",
                "dev",
                "--dry-run",
            ]
        )
        == 0
    )
    params = json.loads(capsys.readouterr().out)
    assert (
        params["nodes"],
        params["ntasks_per_node"],
        params["time"],
        params["qos"],
        params["account"],
    ) == (4, 4, 120, "qos_gpu_h100-dev", "xyz@h100")


def test_submit_refuses_a_bad_run_before_queueing_anything(tmp_path, tiny_dataset):
    run = f"run.dir={tmp_path}/run"
    with pytest.raises(ShardError, match="manifest.json not found"):
        launch.submit(
            "configs/tiny.yaml", [f"data.sources.0.path={tmp_path}/nothing", run], executor="local"
        )
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        launch.submit(
            "configs/tiny.yaml",
            [f"data.sources.0.path={tiny_dataset}", "optim.learning_rate=1", run],
        )
    with pytest.raises(ConfigError, match="runs on this machine only"):
        launch.submit(
            "configs/tiny.yaml",
            [f"data.sources.0.path={tiny_dataset}", run],
            nodes=2,
            executor="local",
        )
    assert not (tmp_path / "run").exists()  # nothing submitted, not even submitit's folder


def test_jobs_run_wandb_offline_unless_told_otherwise(tiny_dataset):
    data = f"data.sources.0.path={tiny_dataset}"
    assert launch.prepare("configs/tiny.yaml", [data, "wandb.mode=online"]).wandb.mode == "online"
    assert launch.prepare("configs/tiny.yaml", [data]).wandb.mode == "offline"
    assert (
        launch.prepare("configs/tiny.yaml", [data, "wandb.mode=disabled"]).wandb.mode == "disabled"
    )
    assert (
        launch.prepare("configs/tiny.yaml", [data], cluster="jean-zay-a100").cluster
        == "jean-zay-a100"
    )
