"""`megatrain prep` over several processes: the same bytes for 1, 2 or 3 local workers and for 2 MPI
ranks; a run killed with SIGKILL at any stage and rerun ends with the same bytes too."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatrain.shards import Dataset, ShardError
from tests.helpers import REPO, output_bytes, planted_reference

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted corpus, its recipe, and the output of a plain 1-process run."""
    root = planted_reference(tmp_path_factory.mktemp("planted"))
    assert len(output_bytes(root / "ref")) >= 4
    return root


def prep_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "megatrain"),
        "prep",
        str(root / "raw"),
        "--out",
        str(out),
        "--recipe",
        str(root / "recipe.yaml"),
        *extra,
    ]


def run(cmd, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.mark.parametrize("workers", [2, 3])
def test_same_output_for_any_number_of_workers(planted, tmp_path, workers):
    out = tmp_path / "out"
    proc = run(prep_cmd(planted, out, "--workers", str(workers)))
    assert f"on {workers} worker(s)" in proc.stdout and "removed: near_dedup" in proc.stdout
    assert output_bytes(out) == output_bytes(planted / "ref")
    assert (out / "rejects" / "exact_dedup.jsonl").read_text() == (
        planted / "ref" / "rejects" / "exact_dedup.jsonl"
    ).read_text()
    assert not (out / ".prep-work").exists()


def test_same_output_under_mpiexec(planted, tmp_path):
    out = tmp_path / "out"
    proc = run([str(BIN / "mpiexec"), "-n", "2", *prep_cmd(planted, out)])
    assert (
        "on 2 worker(s)" in proc.stdout and proc.stdout.count("documents out") == 1
    )  # rank 0 reports
    assert output_bytes(out) == output_bytes(planted / "ref")


@pytest.mark.parametrize("point", ["scan:3", "tokenize:2", "shard:1", "manifest:1"])
def test_kill_9_then_rerun_gives_the_same_bytes(planted, tmp_path, point):
    out = tmp_path / "out"
    killed = run(
        prep_cmd(planted, out, "--workers", "2"), env={"MEGATRAIN_PREP_KILL_AT": point}, check=False
    )
    # whichever process passes the point first dies: rank 0 (-9), or a worker, which rank 0
    # reports (2)
    assert killed.returncode in (-signal.SIGKILL, 2), killed.stderr
    with pytest.raises(ShardError):  # nothing a trainer could take for a whole dataset
        Dataset(out)
    proc = run(prep_cmd(planted, out, "--workers", "2"))
    assert "resuming the unfinished prep" in proc.stdout
    assert output_bytes(out) == output_bytes(planted / "ref")


def test_kill_9_from_outside_stops_the_workers_and_resumes(planted, tmp_path):
    out = tmp_path / "out"
    parent = subprocess.Popen(
        prep_cmd(planted, out, "--workers", "2"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(2.0)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _workers_of(out):
        time.sleep(0.1)
    assert not _workers_of(out), "workers outlived their parent"
    run(prep_cmd(planted, out, "--workers", "2"))
    assert output_bytes(out) == output_bytes(planted / "ref")
    shutil.rmtree(out)


def _workers_of(out: Path) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if "data_prep.launch" in line and str(out) in line]
