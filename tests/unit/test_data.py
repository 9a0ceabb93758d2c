import numpy as np
import pytest
import torch

from megatrain.data import (
    IGNORE_INDEX,
    DataLoader,
    Mixture,
    PackedSamples,
    Permutation,
    validation_batches,
)
from megatrain.plan import BatchLayout
from megatrain.shards import Dataset
from tests.unit.test_shards import make_dataset


@pytest.fixture
def dataset(tmp_path):
    make_dataset(tmp_path, [300, 200])
    return Dataset(tmp_path)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 65537])
def test_permutation_is_a_seeded_bijection_with_inverse(n):
    p = Permutation(n, seed=7)
    out = p(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    assert np.array_equal(p.inverse(out), np.arange(n))
    assert np.array_equal(Permutation(n, seed=7)(np.arange(n)), out)
    if n > 10:
        assert not np.array_equal(Permutation(n, seed=8)(np.arange(n)), out)
        assert not np.array_equal(out, np.arange(n))


def test_train_and_validation_samples_are_disjoint_and_epochs_reshuffle(dataset):
    samples = PackedSamples(dataset, seq_len=16, val_fraction=0.1, seed=3)
    val = set(samples.val_sample_ids(10**9).tolist())
    epoch0 = samples.train_sample_ids(np.arange(samples.num_train))
    epoch1 = samples.train_sample_ids(np.arange(samples.num_train, 2 * samples.num_train))
    assert len(val) == samples.num_val > 0
    assert not val & set(epoch0.tolist())
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) and not np.array_equal(epoch0, epoch1)
    assert sorted(val | set(epoch0.tolist())) == list(range(samples.num_samples))
    s = samples.read(5)
    assert len(s) == 17 and np.array_equal(s, dataset.stream.read(80, 97))


def test_mixture_honours_weights_in_every_window():
    weights = [67, 15, 4.5, 4.5, 4.5, 2.5, 2]  # the LLaMA table
    mix = Mixture(weights)
    expected = np.array(weights) / sum(weights)
    for start, length in [(0, 10_000), (123_457, 50_000), (10**9, 5_000)]:
        d, _ = mix.locate(np.arange(start, start + length))
        share = np.bincount(d, minlength=len(weights)) / length
        assert np.abs(share - expected).max() < 0.01
    d, j = mix.locate(np.arange(30_000))
    for k in range(
        len(weights)
    ):  # each dataset's samples are taken in order, none skipped or repeated
        assert np.array_equal(j[d == k], np.arange((d == k).sum()))


def test_global_order_does_not_depend_on_world_size(dataset):
    samples = [PackedSamples(dataset, 16, 0.05, seed=1)]
    seen = {}
    for dp in (1, 2, 4):
        layout = BatchLayout(micro_batch=2, grad_accum=4 // dp, dp_size=dp, seq_len=16)
        steps = []
        loaders = [
            DataLoader(samples, [1.0], layout, r, consumed_samples=0, prefetch=1) for r in range(dp)
        ]
        for _ in range(5):
            rows = [b.inputs for ld in loaders for b in ld.next_step()]
            steps.append(np.concatenate([r.numpy() for r in rows]))
        for ld in loaders:
            ld.close()
        seen[dp] = steps
    for dp in (2, 4):
        for a, b in zip(seen[1], seen[dp]):
            assert np.array_equal(a, b)


def test_loader_resumes_at_consumed_samples(dataset):
    samples = [PackedSamples(dataset, 16, 0.05, seed=1)]
    layout = BatchLayout(2, 1, 1, 16)
    full = DataLoader(samples, [1.0], layout, 0)
    batches = [full.next_step()[0].targets for _ in range(4)]
    full.close()
    resumed = DataLoader(samples, [1.0], layout, 0, consumed_samples=4)
    assert np.array_equal(resumed.next_step()[0].targets, batches[2])
    resumed.close()


def test_validation_batches_pad_so_every_rank_runs_the_same_number(dataset):
    samples = [PackedSamples(dataset, 16, 0.05, seed=1)]
    per_rank = [
        validation_batches(samples, [1.0], 9, micro_batch=4, dp_rank=r, dp_size=2) for r in range(2)
    ]
    assert [len(b) for b in per_rank] == [2, 2]
    real = sum(int((b.targets != IGNORE_INDEX).any(dim=1).sum()) for bs in per_rank for b in bs)
    assert real == 9


def test_mixture_of_two_datasets_honours_weights_over_a_run(tmp_path):
    """Dataset A has ids < 500, B ids >= 500: count where each sample of 200 steps came from."""
    import numpy as np_

    from megatrain.shards import Manifest, write_shard

    sources = []
    for name, low, high in [("a", 1, 500), ("b", 500, 1000)]:
        d = tmp_path / name
        d.mkdir()
        rng = np_.random.default_rng(len(name))
        docs = [
            np_.append(rng.integers(low, high, size=200), 0 if name == "a" else 999)
            for _ in range(50)
        ]
        info = write_shard(d / "shard-00000.arrow", docs, 1000)
        Manifest(
            vocab_size=1000, eos_id=0, tokenizer_file="t", tokenizer_sha256="x", shards=[info]
        ).write(d)
        sources.append(PackedSamples(Dataset(d), 16, 0.0, seed=1))
    layout = BatchLayout(micro_batch=8, grad_accum=1, dp_size=2, seq_len=16)
    counts = np_.zeros(2)
    loaders = [DataLoader(sources, [0.8, 0.2], layout, r) for r in range(2)]
    for _ in range(200):
        for ld in loaders:
            rows = ld.next_step()[0].inputs
            from_b = (rows >= 500).sum(dim=1) > 8
            counts += [int((~from_b).sum()), int(from_b.sum())]
    for ld in loaders:
        ld.close()
    assert abs(counts[0] / counts.sum() - 0.8) < 0.01


def test_the_loader_keeps_the_whole_device_it_is_given(dataset):
    """Its thread copies batches to the device: "cuda" alone would mean GPU 0 in that thread."""
    samples = [PackedSamples(dataset, 16, 0.0, seed=0)]
    loader = DataLoader(samples, [1.0], BatchLayout(2, 1, 1, 16), 0, device=torch.device("cuda", 3))
    assert loader.device == torch.device("cuda", 3)  # nothing runs before the first step
    loader.close()
