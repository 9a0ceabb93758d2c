"""Progress of a prep stage over all ranks: a bar on a terminal, a plain line now and then in a log.

Each rank counts its own documents, characters and units and drops the counts into a small
file every second (OUT/.prep-work/progress/); rank 0 sums the files of all ranks and draws.
On a TTY it redraws one line; otherwise (Slurm logs) it prints a line every
MEGATRAIN_PROGRESS_S seconds (default 30) and one at the end of the stage.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from megatrain.files import atomic_write_text


class Progress:
    def __init__(
        self,
        directory: Path,
        stage: str,
        rank: int,
        size: int,
        total_units: int,
        display: bool,
        log=print,
        stream=None,
    ):
        self.dir, self.stage, self.rank, self.size = directory, stage, rank, size
        self.total_units, self.log = total_units, log
        self.counts = {"docs": 0, "chars": 0, "tokens": 0, "units": 0}
        self.start = time.monotonic()
        self.last_write = 0.0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.5 if self.tty else float(os.environ.get("MEGATRAIN_PROGRESS_S", "30"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._thread = None
        if display and log is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def add(self, docs: int = 0, chars: int = 0, tokens: int = 0, units: int = 0) -> None:
        c = self.counts
        c["docs"] += docs
        c["chars"] += chars
        c["tokens"] += tokens
        c["units"] += units
        now = time.monotonic()
        if now - self.last_write > 1.0 or units:
            self._write()
            self.last_write = now

    def _write(self) -> None:  # advisory: no fsync
        path = self.dir / f"{self.stage}.{self.rank}.json"
        atomic_write_text(path, json.dumps(self.counts), fsync=False)

    def _total(self) -> dict:
        total = {k: 0 for k in self.counts}
        for r in range(self.size):
            try:
                counts = (
                    self.counts
                    if r == self.rank
                    else json.loads((self.dir / f"{self.stage}.{r}.json").read_text())
                )
            except (OSError, ValueError):
                continue
            for k in total:
                total[k] += counts.get(k, 0)
        return total

    def line(self) -> str:
        t = self._total()
        elapsed = max(time.monotonic() - self.start, 1e-9)
        frac = t["units"] / self.total_units if self.total_units else 1.0
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        text = (
            f"{self.stage:<9} [{bar}] {t['units']}/{self.total_units} units  {t['docs']:,} docs  "
            f"{t['chars'] / 1e6:,.1f} MB  {t['chars'] / 1e6 / elapsed:,.2f} MB/s"
        )
        if t["tokens"]:
            text += f"  {t['tokens'] / elapsed:,.0f} tokens/s"
        return text

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.tty:
                self.stream.write("\r" + self.line())
                self.stream.flush()
            else:
                self.log(self.line())

    def close(self) -> None:
        self._write()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self.tty:
                self.stream.write("\r" + self.line() + "\n")
                self.stream.flush()
            else:
                self.log(self.line())
