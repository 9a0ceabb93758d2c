"""`megatrain train CONFIG --nproc N` on one machine: our own launcher, not torchrun's agent.

torchrun's elastic agent starts its ranks in sessions of their own (killing the job leaves them
training), keeps SIGTERM to itself, and turns a rank's one-line error into a page of
tracebacks. This launcher:

- checks first what can be checked without a rank (`preflight`): the datasets' manifests, the
  run plan (parallel layout, batch), the cluster profile, the run directory; a user's mistake is
  one line and exit 2, and no rank starts;
- starts N ranks with the variables torchrun would set (`dist.DistEnv.from_environ` reads
  them), in the launcher's process group, each killed by the kernel when the launcher dies
  (`PR_SET_PDEATHSIG`), so that `kill -9` of the launcher or of its group leaves no rank running;
- forwards SIGTERM, SIGUSR1, SIGUSR2 and SIGINT to the ranks, which save a checkpoint and stop at
  the same step (megatrain/stop.py); a second SIGINT kills them at once (exit 130);
- relays the ranks' stderr; once a rank has failed it stops the others (SIGTERM and SIGCONT, for
  a stopped rank, then SIGKILL after `GRACE_S`: a rank blocked in a collective cannot stop
  itself), relays only their one-line errors, each distinct one once, and exits 2 if a rank
  exited 2 (a user's error), 3 if a rank's watchdog found it hung (megatrain/watchdog.py), else 1.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from megatrain import stop
from megatrain.config import Config, load_cluster
from megatrain.errors import MegatrainError
from megatrain.locks import check_run_dir_free
from megatrain.plan import plan_run
from megatrain.shards import Manifest
from megatrain.watchdog import HANG_EXIT

GRACE_S = 5.0  # how long a failed job's other ranks get to exit before SIGKILL
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
ERROR_PREFIX = b"megatrain train: error:"  # how cli.main prints a MegatrainError
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RunDirError(MegatrainError):
    """The run directory cannot be created or written."""


def preflight(cfg: Config, nproc: int) -> None:
    """What the ranks would find wrong in their first seconds, found before any starts: every
    dataset's manifest reads, the run plan holds on `nproc` processes, the cluster profile loads,
    the run directory can be created and written, and no other training holds it. Each raises
    a named error."""
    manifests = [Manifest.read(src.path) for src in cfg.data.sources]
    vocab = manifests[0].vocab_size if manifests else None
    plan_run(cfg, nproc, vocab, nproc)
    load_cluster(cfg.cluster)
    probe = cfg.run_dir / f".write-test-{os.getpid()}"
    try:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(
            f"'run.dir' {cfg.run_dir} cannot be written ({e.strerror}): choose another run.dir "
            "or fix its permissions"
        ) from None
    check_run_dir_free(cfg.run_dir)


def free_port() -> int:
    """A TCP port nobody listens on now, for rank 0's rendezvous store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with(parent: int):
    """preexec_fn: the kernel SIGKILLs this child when its parent dies, even by SIGKILL."""

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return arm


class Launch:
    """N local ranks of one training command, and what happens to them."""

    def __init__(self, argv: list[str], nproc: int, env: dict[str, str]):
        self.argv, self.nproc, self.env = argv, nproc, env
        self.procs: list[subprocess.Popen] = []
        self.failed: int | None = None  # the first rank that exited non-zero
        self.failed_at = 0.0
        self.interrupts = 0
        self.sent: list[int] = []  # signals forwarded so far
        self._relays: list[threading.Thread] = []
        self._printed: set[bytes] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        port = free_port()
        for rank in range(self.nproc):
            env = {
                **self.env,
                "RANK": str(rank),
                "WORLD_SIZE": str(self.nproc),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(self.nproc),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                stop.LAUNCHER_ENV: str(os.getpid()),  # a second Ctrl-C is ours
            }
            proc = subprocess.Popen(
                self.argv, env=env, stderr=subprocess.PIPE, preexec_fn=_die_with(os.getpid())
            )
            self.procs.append(proc)
            relay = threading.Thread(target=self._relay, args=(rank, proc), daemon=True)
            relay.start()
            self._relays.append(relay)
        for signum in self.sent:  # a signal that came while the ranks were starting
            self.signal_ranks(signum)
        pids = " ".join(str(p.pid) for p in self.procs)
        print(f"megatrain train: started {self.nproc} ranks (pids {pids})", flush=True)

    def _relay(self, rank: int, proc: subprocess.Popen) -> None:
        """Copy a rank's stderr to ours. After another rank failed, only one-line errors pass
        (the rest is what a dead peer does to a collective); each error line passes once."""
        for line in iter(proc.stderr.readline, b""):
            is_error = line.startswith(ERROR_PREFIX)
            with self._lock:
                if is_error and line in self._printed:
                    continue
                if self.failed not in (None, rank) and not is_error:
                    continue
                self._printed.add(line)
                sys.stderr.buffer.write(line)
                sys.stderr.buffer.flush()

    def signal_ranks(self, signum: int) -> None:
        # returncode, not poll(): a signal handler must not take Popen's lock, which the main
        # loop's poll() may hold; a rank not yet reaped keeps its pid
        for p in self.procs:
            if p.returncode is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    def on_signal(self, signum, frame) -> None:
        """Forward a stop signal; a second SIGINT (Ctrl-C) kills the ranks at once."""
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                self.signal_ranks(signal.SIGKILL)  # dead within milliseconds, unsaved
                print("megatrain train: interrupted twice; ranks killed", file=sys.stderr)
                sys.stderr.flush()
                os._exit(130)
        self.sent.append(signum)
        self.signal_ranks(signum)

    def wait(self) -> int:
        """Until every rank has exited; the job's exit code."""
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                break
            if self.failed is None:
                bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if bad:
                    with self._lock:
                        self.failed, self.failed_at = bad[0], time.monotonic()
                    self.signal_ranks(signal.SIGTERM)
                    self.signal_ranks(signal.SIGCONT)  # a stopped rank gets its SIGTERM now
            elif time.monotonic() - self.failed_at > GRACE_S:
                self.signal_ranks(signal.SIGKILL)
            time.sleep(0.05)
        for relay in self._relays:  # the last lines; a rank's W&B helper may hold its stderr
            relay.join(timeout=1.0)
        codes = [p.returncode for p in self.procs]
        if all(c == 0 for c in codes):
            return 0
        if 2 in codes:
            return 2
        return HANG_EXIT if HANG_EXIT in codes else 1


def launch_local(cfg: Config, argv: list[str], nproc: int) -> int:
    """Run `argv` (a `megatrain train` command) as `nproc` ranks on this machine, after
    `preflight`; returns the exit code (0, 1 a crash, 2 a user's error, 3 a hang, 130
    interrupted)."""
    preflight(cfg, nproc)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    launch = Launch(argv, nproc, env)
    for s in FORWARDED:
        signal.signal(s, launch.on_signal)
    early = stop.received_signal()  # during the imports and the preflight
    if early:
        print(f"megatrain train: {early} before the ranks started; nothing to stop")
        return 130 if early == "SIGINT" else 0
    launch.start()
    return launch.wait()
