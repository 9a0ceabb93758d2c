"""From token shards to the micro-batches each rank trains on.

The order of samples is a pure function of (seed, datasets, seq_len), never of the number of
ranks: the run consumes a single global sequence of samples, numbered g = 0, 1, 2, ...; each
optimizer step takes the next `global_batch` of them and rank r reads only its contiguous slice.
A run's data position is therefore one integer, `consumed_samples`, and a checkpoint taken on
8 GPUs resumes on 4 at the very next sample.

    sample (dataset d, index i)  = d's token stream [i*T, i*T + T + 1)    packed across documents
    held-out / train split       = a seeded permutation of each dataset's samples
    epoch order of train samples = another seeded permutation per epoch
    global g -> (dataset, j)     = a fixed weighted interleave (mixtures honour weights to 1e-4)

Permutations are computed on the fly (a Feistel network with cycle walking), so memory does
not grow with the dataset: a trillion-token corpus costs the same few bytes as the demo's.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from megatrain.hashing import mix64
from megatrain.plan import BatchLayout
from megatrain.schema import ConfigError
from megatrain.shards import Dataset


class Permutation:
    """A seeded bijection of [0, n), evaluated element-wise in O(1) memory.

    A 4-round balanced Feistel network permutes [0, 4^h) with 4^h >= n; values that land
    outside [0, n) are encrypted again until they fall inside (cycle walking), which keeps it a
    bijection of [0, n). `inverse` undoes it.
    """

    def __init__(self, n: int, seed: int, rounds: int = 4):
        self.n = int(n)
        self.half_bits = max(1, math.ceil(math.log2(max(self.n, 2)) / 2))
        self.mask = np.uint64((1 << self.half_bits) - 1)
        rng = np.random.Generator(np.random.PCG64(seed))
        self.keys = [np.uint64(k) for k in rng.integers(0, 2**63, size=rounds)]

    def _round(self, r: np.ndarray, key: np.uint64) -> np.ndarray:
        return mix64(r ^ key) & self.mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half_bits)
        left, right = x >> h, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << h) | right

    def _decrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half_bits)
        left, right = x >> h, x & self.mask
        for key in reversed(self.keys):
            left, right = right ^ self._round(left, key), left
        return (left << h) | right

    def _walk(self, idx, step) -> np.ndarray:
        x = np.asarray(idx, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index {int(x.max())} outside a permutation of {self.n}")
        out = step(x)
        outside = out >= np.uint64(self.n)
        while outside.any():
            out[outside] = step(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)

    def __call__(self, idx) -> np.ndarray:
        return self._walk(idx, self._encrypt)

    def inverse(self, idx) -> np.ndarray:
        return self._walk(idx, self._decrypt)


class PackedSamples:
    """One dataset cut into samples of seq_len + 1 tokens (inputs and shifted targets)."""

    def __init__(self, dataset: Dataset, seq_len: int, val_fraction: float, seed: int):
        self.dataset, self.seq_len = dataset, seq_len
        self.num_samples = (dataset.num_tokens - 1) // seq_len
        self.num_val = math.ceil(self.num_samples * val_fraction) if val_fraction > 0 else 0
        self.num_train = self.num_samples - self.num_val
        if self.num_train < 1:
            held = f", {self.num_val} held out for validation" if self.num_val else ""
            raise ConfigError(
                f"'data.seq_len' = {seq_len} is too long for {dataset.directory}: its "
                f"{dataset.num_tokens} tokens make {self.num_samples} samples{held}, none left "
                "for training; lower data.seq_len or data.val_fraction, or add data"
            )
        self._split = Permutation(self.num_samples, seed)  # positions [0, num_val) are held out
        self._seed = seed

    def train_sample_ids(self, j: np.ndarray) -> np.ndarray:
        """The j-th train sample of the run (j may exceed num_train: each epoch has its own
        order)."""
        j = np.asarray(j, dtype=np.int64)
        epochs, within = np.divmod(j, self.num_train)
        out = np.empty_like(j)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            order = Permutation(self.num_train, self._seed + 1 + int(epoch))
            out[sel] = self._split.inverse(self.num_val + order(within[sel]))
        return out

    def val_sample_ids(self, count: int) -> np.ndarray:
        return self._split.inverse(np.arange(min(count, self.num_val)))

    def read(self, sample_id: int) -> np.ndarray:
        start = int(sample_id) * self.seq_len
        return self.dataset.stream.read(start, start + self.seq_len + 1)


class Mixture:
    """Interleaves datasets by weight: global sample g -> (dataset index, j-th sample of that
    dataset).

    The interleave repeats a fixed pattern of `period` slots in which dataset d gets its quota
    q_d = weight_d x period (largest remainders); slots are spread by smooth weighted round-robin,
    so any window of the run has close to the right proportions, and lookups are O(1).
    """

    def __init__(self, weights: list[float], period: int = 10_000):
        w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        quota = np.floor(w * period).astype(np.int64)
        for d in np.argsort(-(w * period - quota), kind="stable")[: period - quota.sum()]:
            quota[d] += 1
        pattern, seen, credit = (
            np.empty(period, np.int64),
            np.zeros(len(w), np.int64),
            np.zeros(len(w)),
        )
        for slot in range(period):
            credit += quota
            d = int(np.argmax(credit))
            credit[d] -= period
            pattern[slot] = d
        self.weights, self.period, self.quota, self.pattern = w, period, quota, pattern
        self.rank_in_slot = np.empty(
            period, np.int64
        )  # how many earlier slots went to the same dataset
        for slot, d in enumerate(pattern):
            self.rank_in_slot[slot] = seen[d]
            seen[d] += 1

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cycle, slot = np.divmod(np.asarray(g, dtype=np.int64), self.period)
        d = self.pattern[slot]
        return d, cycle * self.quota[d] + self.rank_in_slot[slot]


@dataclass
class Batch:
    inputs: torch.Tensor  # (micro_batch, seq_len) token ids
    targets: torch.Tensor  # inputs shifted by one


class DataLoader:
    """This rank's micro-batches, step after step, from the global sample order.

    Step s covers global samples [s0 + s*B, s0 + (s+1)*B) with B the global batch; rank r reads
    [r*b, (r+1)*b) of them with b = micro_batch x grad_accum, in micro-batches of micro_batch.
    A background thread, started at the first step, stays `prefetch` steps ahead. The data
    position, `consumed_samples`, is the loader's checkpoint state.
    """

    def __init__(
        self,
        sources: list[PackedSamples],
        weights: list[float],
        layout: BatchLayout,
        dp_rank: int,
        consumed_samples: int = 0,
        prefetch: int = 2,
        device: torch.device | str = "cpu",
    ):
        self.sources, self.layout, self.dp_rank = sources, layout, dp_rank
        self.mixture = Mixture(weights)
        self.consumed_samples = consumed_samples
        self.device = torch.device(device)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("the data position can only be set before the first step")
        self.consumed_samples = int(state["consumed_samples"])

    def sample_ids(self, first_global: int, count: int) -> list[tuple[int, int]]:
        """(dataset, sample id) of global samples [first_global, first_global + count)."""
        d, j = self.mixture.locate(np.arange(first_global, first_global + count))
        ids = np.empty_like(j)
        for k, src in enumerate(self.sources):
            sel = d == k
            if sel.any():
                ids[sel] = src.train_sample_ids(j[sel])
        return list(zip(d.tolist(), ids.tolist()))

    def _step_batches(self, step_start: int) -> list[Batch]:
        L = self.layout
        per_rank = L.micro_batch * L.grad_accum
        ids = self.sample_ids(step_start + self.dp_rank * per_rank, per_rank)
        rows = np.stack([self.sources[d].read(i) for d, i in ids]).astype(np.int64)
        tokens = torch.from_numpy(rows)
        if self.device.type == "cuda":  # one pinned copy of the whole step, sliced on the device
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        out = []
        for m in range(L.grad_accum):
            chunk = tokens[m * L.micro_batch : (m + 1) * L.micro_batch]
            out.append(Batch(chunk[:, :-1], chunk[:, 1:]))
        return out

    def _produce(self, start: int) -> None:
        g = start
        try:
            if self.device.type == "cuda":  # the current device is per thread: set it in this one
                torch.cuda.set_device(self.device)
            while not self._stop.is_set():
                item = (g, self._step_batches(g))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                g += self.layout.global_batch
        except BaseException as e:  # surfaced in the training thread by next_step()
            self._queue.put((None, e))

    def next_step(self) -> list[Batch]:
        """The grad_accum micro-batches of the next optimizer step for this rank."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._produce, args=(self.consumed_samples,), daemon=True
            )
            self._thread.start()
        g, batches = self._queue.get()
        if g is None:
            raise batches
        assert g == self.consumed_samples, "prefetch thread out of step"
        self.consumed_samples += self.layout.global_batch
        return batches

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: padding rows add no loss


def validation_batches(
    sources: list[PackedSamples],
    weights: list[float],
    total_samples: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
) -> list[Batch]:
    """This rank's share of a fixed validation set (the same samples whatever the world size).

    Every rank gets the same number of micro-batches (ZeRO-3 needs all ranks in every forward);
    ranks with fewer samples pad with rows whose targets are IGNORE_INDEX.
    """
    w = np.asarray(weights) / np.sum(weights)
    rows = []
    for src, share in zip(sources, w):
        rows += [src.read(i) for i in src.val_sample_ids(math.ceil(total_samples * share))]
    if not rows:
        return []
    per_rank = math.ceil(len(rows) / dp_size)
    mine = [r.astype(np.int64) for r in rows[dp_rank::dp_size]]
    padding = per_rank - len(mine)
    tokens = torch.from_numpy(np.stack(mine + [rows[0].astype(np.int64)] * padding))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    if padding:
        targets[len(mine) :] = IGNORE_INDEX
    return [
        Batch(inputs[i : i + micro_batch], targets[i : i + micro_batch])
        for i in range(0, per_rank, micro_batch)
    ]
