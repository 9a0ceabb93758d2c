"""Measurements taken inside a real run on request, to check `megatrain plan` against.

    MEGATRAIN_MEMORY_PROBE=FILE   each rank writes FILE.rank<r>.json: the peak bytes of live
                                  tensors during its first `MEGATRAIN_MEMORY_PROBE_STEPS` steps
                                  (default 2), counted tensor by tensor; on a GPU also
                                  torch.cuda.max_memory_allocated

On a GPU the allocator's own peak is the number (and it is logged at every step anyway); on the
CPU there is no allocator peak, so the probe counts tensors: those alive when it starts (found
through the garbage collector, each storage once) and every storage an operation creates until
it is freed.
"""

from __future__ import annotations

import gc
import json
import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from megatrain.callbacks import Callback
from megatrain.files import atomic_write_text

PROBE_ENV = "MEGATRAIN_MEMORY_PROBE"
STEPS_ENV = "MEGATRAIN_MEMORY_PROBE_STEPS"


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages, and their peak, while active: those reachable from Python
    when it starts (through the garbage collector) plus every storage an operation creates, each
    counted until it is freed."""

    def __init__(self):
        super().__init__()
        self.known = WeakIdKeyDictionary()
        self.live = self.peak = 0
        gc.collect()  # no garbage taken for live tensors
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                self._count(obj.untyped_storage())
        self.peak = self.live

    def _count(self, storage) -> None:
        if storage.device.type == "meta" or storage in self.known:
            return  # (fake tensors, such as `megatrain plan`'s, have meta storages)
        size = storage.nbytes()
        self.known[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t.untyped_storage())
        return out


class MemoryProbe(Callback):
    def __init__(self, path: str, steps: int = 2):
        self.path, self.steps = path, steps
        self.counter: LiveBytes | None = None

    def on_start(self, trainer) -> None:
        self.first_step = trainer.step
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        self.counter = LiveBytes()
        self.counter.__enter__()

    def on_step_end(self, trainer, loss: float, skipped: bool) -> None:
        if self.counter is None or trainer.step - self.first_step < self.steps:
            return
        self._stop()
        result = {"rank": trainer.rank, "steps": self.steps, "peak_bytes": self.peak}
        if trainer.device.type == "cuda":
            result["max_memory_allocated"] = torch.cuda.max_memory_allocated(trainer.device)
        atomic_write_text(f"{self.path}.rank{trainer.rank}.json", json.dumps(result))

    def _stop(self) -> None:
        self.counter.__exit__(None, None, None)
        self.peak, self.counter = self.counter.peak, None

    def on_close(self, trainer, error) -> None:
        if self.counter is not None:
            self._stop()


def from_environ(environ=os.environ) -> list[Callback]:
    """The probes the environment asks for."""
    if not environ.get(PROBE_ENV):
        return []
    return [MemoryProbe(environ[PROBE_ENV], int(environ.get(STEPS_ENV, "2")))]
