"""A real local Slurm cluster for the tests in tests/cluster.

The session fixture ``slurm_cluster`` runs ``local_slurm.sh start`` once (installing the
Debian packages the first time), hands the tests a :class:`SlurmCluster`, and stops the
cluster at the end of the session if it started it. A cluster that was already up (e.g.
``sudo tests/cluster/local_slurm.sh start`` by hand) is reused and left running.

Typical use::

    def test_something(slurm_cluster, tmp_path):
        job = slurm_cluster.submit(JOBS / "x.sh", slurm_cluster.python, cwd=tmp_path)
        assert slurm_cluster.wait(job) == "COMPLETED"
        assert "ok" in slurm_cluster.job_output(job)

The nodes are network namespaces on a bridge (``cluster.network == "netns"``: each has its own
address, hostname and link, which :meth:`SlurmCluster.link_down` can cut) where the machine
allows it, else all on 127.0.0.1 (``"loopback"``); tests that need a real network call
:meth:`SlurmCluster.require_netns`, which skips with the reason in loopback mode.

Environment: ``LOCAL_SLURM_KEEP=1`` leaves a cluster started by the session running
(faster reruns); the ``LOCAL_SLURM_*`` knobs of local_slurm.sh shape it (``LOCAL_SLURM_NET``:
netns, loopback or auto). Where a
cluster cannot be had (not root, no apt and no Slurm, a foreign slurm.conf) the tests
skip, except under ``CI=...``, where they fail: CI must really run them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# a fixture: one uninterrupted run per session
from tests.cluster.training import reference_run  # noqa: F401

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "local_slurm.sh"
CONF = Path("/etc/slurm/slurm.conf")
CONF_MARK = "# Written by megatrain tests/cluster/local_slurm.sh"

# Job states after which nothing more happens (REQUEUED, COMPLETING, PENDING... are not).
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
# Variables that would leak into sbatch/srun from a pytest that itself runs inside a job.
_SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")

_timings: dict[str, float] = {}


def _run(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


class SlurmCluster:
    """Helpers to run batch jobs on the local cluster. Job ids are strings, as sbatch prints
    them."""

    def __init__(self) -> None:
        self.script = SCRIPT
        #: the Python that runs the tests; pass it to jobs so they use the test venv,
        #: not /usr/bin/python3
        self.python = sys.executable
        #: fake node names, in order (node1, node2, ...)
        self.nodes = _run("sinfo", "-h", "-N", "-o", "%N").stdout.split()
        self.nodes = sorted(set(self.nodes), key=lambda n: (len(n), n))
        self._stdout: dict[str, Path] = {}
        status = _run(str(SCRIPT), "status", check=False).stdout
        m = re.search(r"^\s*network: (\w+)(?: \((.*)\))?$", status, re.MULTILINE)
        #: "netns" (a network namespace per node, on a bridge) or "loopback" (all on 127.0.0.1)
        self.network = m.group(1) if m else "loopback"
        #: what local_slurm.sh said about it: in loopback mode, why (the skip reason of netns tests)
        self.network_reason = (m.group(2) if m else None) or "local_slurm.sh names no network"

    # -- the network -----------------------------------------------------------------------
    def require_netns(self) -> None:
        """Skip the calling test, with the reason, unless every node has a network of its own."""
        if self.network != "netns":
            pytest.skip(
                f"needs the netns network; the cluster runs on loopback: {self.network_reason}"
            )

    def set_link(self, node: str, up: bool) -> None:
        """Cut (``up=False``) or restore a node's link: its veth end on the bridge goes down/up.
        The node keeps its address and routes; what it sends or is sent is dropped meanwhile.
        Slurm marks it DOWN after SlurmdTimeout (30 s) without an answer, and then asks it to
        register only every ~20 pings (up to ~200 s); ``scontrol update nodename=NODE
        state=resume``, as an admin would, brings it back within a second of the link's return."""
        self.require_netns()
        _run(str(SCRIPT), "link", node, "up" if up else "down")

    @contextlib.contextmanager
    def link_down(self, node: str) -> Iterator[None]:
        """``with cluster.link_down("node2"): ...``: the node's link is cut inside, restored after,
        even when the block raises."""
        self.set_link(node, False)
        try:
            yield
        finally:
            self.set_link(node, True)

    # -- submitting ------------------------------------------------------------------------
    def submit(
        self,
        script: str | os.PathLike,
        *args: str,
        cwd: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        sbatch_args: tuple[str, ...] | list[str] = (),
    ) -> str:
        """``sbatch --parsable [sbatch_args] script args...`` from ``cwd``; returns the job id.

        The job inherits this process's environment (minus SLURM_*/SBATCH_*), updated with ``env``.
        Its output goes where the script's ``#SBATCH --output`` says, else ``cwd/slurm-<id>.out``.
        """
        job_env = {k: v for k, v in os.environ.items() if not k.startswith(_SLURM_ENV_PREFIXES)}
        job_env.update(env or {})
        cwd = Path(cwd) if cwd is not None else Path.cwd()
        proc = subprocess.run(
            ["sbatch", "--parsable", f"--chdir={cwd}", *sbatch_args, str(script), *map(str, args)],
            cwd=cwd,
            env=job_env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"sbatch {script} failed (rc={proc.returncode}): {proc.stderr.strip()}"
            )
        job_id = proc.stdout.strip().split(";")[0]  # "<id>[;cluster]"
        # Remember where its stdout goes now: scontrol forgets a job MinJobAge (300 s) after it
        # ends.
        self._stdout[job_id] = Path(self.job_info(job_id)["StdOut"])
        return job_id

    # -- inspecting ------------------------------------------------------------------------
    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, NodeList, StdOut, ...); {} once
        forgotten."""
        proc = _run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode != 0:
            return {}
        info = {}
        for field in proc.stdout.split():
            key, _, value = field.partition("=")
            info.setdefault(key, value)  # first one wins (e.g. JobState before any nested key)
        return info

    def state(self, job_id: str) -> str:
        """Current state: from the controller while it knows the job, else from sacct."""
        state = self.job_info(job_id).get("JobState", "")
        if not state:
            out = _run(
                "sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "State", check=False
            ).stdout
            state = out.split("\n")[0].split(" ")[0]  # "CANCELLED by 0" -> "CANCELLED"
        return state

    def wait(self, job_id: str, timeout: float = 120, cancel_on: str | None = None) -> str:
        """Block until the job reaches a final state and return it (e.g. "COMPLETED", "FAILED",
        "TIMEOUT"). A requeued job is followed through its restarts. On timeout the job is
        cancelled and TimeoutError raised with what the job and the controller said.
        `cancel_on`: cancel the job as soon as its output contains this text (a known way for
        it to hang), and return its final state."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in FINAL_STATES:
                return state
            if cancel_on and cancel_on in self._output_so_far(job_id):
                _run("scancel", str(job_id), check=False)
                cancel_on = None  # then wait for the cancellation to complete
            time.sleep(0.25)
        info = self.job_info(job_id)
        _run("scancel", str(job_id), check=False)
        raise TimeoutError(
            f"job {job_id} not finished after {timeout:.0f} s (state {state or '?'}, "
            f"reason {info.get('Reason', '?')})\n--- output\n{self._tail(self._stdout.get(job_id))}"
            f"\n--- slurmctld.log\n{self._tail(Path('/var/log/slurm/slurmctld.log'))}"
        )

    def output_path(self, job_id: str) -> Path:
        """Where the job's stdout goes (resolved %j etc.), as recorded at submit time."""
        return self._stdout[str(job_id)]

    def job_output(self, job: str | os.PathLike) -> str:
        """Text of a job's output: ``job`` is a job id from :meth:`submit` or a file path."""
        path = self._stdout.get(str(job), Path(job))
        if not path.exists():
            raise FileNotFoundError(f"no job output at {path}")
        return path.read_text(errors="replace")

    def _output_so_far(self, job_id: str) -> str:
        try:
            return self._stdout[str(job_id)].read_text(errors="replace")
        except (OSError, KeyError):
            return ""

    def run(
        self,
        script: str | os.PathLike,
        *args: str,
        timeout: float = 120,
        cancel_on: str | None = None,
        **kw,
    ) -> tuple[str, str, str]:
        """submit + wait + job_output: returns (job_id, final_state, output)."""
        job_id = self.submit(script, *args, **kw)
        state = self.wait(job_id, timeout, cancel_on)
        return job_id, state, self.job_output(job_id)

    @staticmethod
    def _tail(path: Path | None, lines: int = 20) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return f"(none at {path})"


def _why_no_cluster() -> str | None:
    """Why this machine cannot get a local cluster, or None if it can."""
    if os.geteuid() != 0:
        return (
            "needs root to start a local Slurm cluster "
            "(or start it first: sudo tests/cluster/local_slurm.sh start)"
        )
    if not shutil.which("slurmctld") and not (shutil.which("apt-get") and shutil.which("dpkg")):
        return "Slurm is not installed and there is no apt-get to install it"
    if CONF.exists() and CONF_MARK not in CONF.read_text(errors="replace").splitlines():
        return f"{CONF} belongs to another Slurm setup; local_slurm.sh will not overwrite it"
    return None


def _status_ok() -> bool:
    try:
        return _run(str(SCRIPT), "status", check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local Slurm cluster (see module docstring); started once per session."""
    was_up = _status_ok()
    reason = None if was_up and os.geteuid() != 0 else _why_no_cluster()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests, but: {reason}")
        pytest.skip(reason)
    if os.geteuid() == 0:  # no-op if already up with the same config; else (re)starts it
        t0 = time.monotonic()
        proc = _run(str(SCRIPT), "start", timeout=900, check=False)
        _timings["local_slurm.sh start"] = time.monotonic() - t0
        if proc.returncode != 0:
            pytest.fail(
                f"local_slurm.sh start failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
    cluster = SlurmCluster()
    yield cluster
    if not was_up and not os.environ.get("LOCAL_SLURM_KEEP"):
        t0 = time.monotonic()
        _run(str(SCRIPT), "stop", timeout=300, check=False)
        _timings["local_slurm.sh stop"] = time.monotonic() - t0


def pytest_collection_modifyitems(config, items):
    # Every test under tests/cluster needs the cluster; `-m "not slurm"` (or "not slow") skips them.
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter):
    for what, seconds in _timings.items():
        terminalreporter.write_line(f"{what}: {seconds:.1f} s")
