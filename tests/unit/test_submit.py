"""`megatrain submit` without a cluster: cluster profiles, sbatch options, QoS, refusals."""

import json

import pytest

from megatrain import hardware, submit
from megatrain.cli import main
from megatrain.config import ConfigError, configs_root, load_cluster
from megatrain.shards import ShardError

PROFILES = sorted(p.stem for p in (configs_root() / "clusters").glob("*.yaml"))


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
    assert submit.parse_slurm_time(text) == minutes


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
    params = submit.slurm_parameters(p, nodes=2, time_min=1200, account="xyz")
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
        submit.slurm_parameters(p, account="xyz@" + name.split("-")[-1])["account"].count("@") == 1
    )


def test_qos_follows_the_time_asked():
    s = load_cluster("jean-zay-h100").slurm
    assert submit.choose_qos(s, None, 20 * 60) == "qos_gpu_h100-t3"
    assert submit.choose_qos(s, None, 50 * 60) == "qos_gpu_h100-t4"  # longer than t3 allows
    assert submit.choose_qos(s, "dev", 60) == "qos_gpu_h100-dev"
    assert (
        submit.choose_qos(s, "qos_gpu_h100-gc", 60) == "qos_gpu_h100-gc"
    )  # full names pass through
    with pytest.raises(ConfigError, match="fits no QoS"):
        submit.choose_qos(s, None, 101 * 60)
    assert submit.choose_qos(load_cluster("local").slurm, None, 10) is None


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
        submit.submit(
            "configs/tiny.yaml", [f"data.sources.0.path={tmp_path}/nothing", run], executor="local"
        )
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        submit.submit(
            "configs/tiny.yaml",
            [f"data.sources.0.path={tiny_dataset}", "optim.learning_rate=1", run],
        )
    with pytest.raises(ConfigError, match="runs on this machine only"):
        submit.submit(
            "configs/tiny.yaml",
            [f"data.sources.0.path={tiny_dataset}", run],
            nodes=2,
            executor="local",
        )
    assert not (tmp_path / "run").exists()  # nothing submitted, not even submitit's folder


def test_jobs_run_wandb_offline_unless_told_otherwise(tiny_dataset):
    data = f"data.sources.0.path={tiny_dataset}"
    assert submit.prepare("configs/tiny.yaml", [data, "wandb.mode=online"]).wandb.mode == "online"
    assert submit.prepare("configs/tiny.yaml", [data]).wandb.mode == "offline"
    assert (
        submit.prepare("configs/tiny.yaml", [data, "wandb.mode=disabled"]).wandb.mode == "disabled"
    )
    assert (
        submit.prepare("configs/tiny.yaml", [data], cluster="jean-zay-a100").cluster
        == "jean-zay-a100"
    )
