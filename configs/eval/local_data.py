"""lm-eval's `custom_dataset` for tasks whose data lies in local files: a JSON Lines file, or a
dataset saved by `datasets`' `save_to_disk`.

lm-eval hands a task's `dataset_kwargs` to `datasets.load_dataset`, which reads a relative
`data_files` path against the current directory. A task that names this function instead
finds its file beside its YAML, whatever the current directory, and reads it in memory:
nothing is downloaded, nothing is written to the datasets cache.

    custom_dataset: !function local_data.load
    dataset_kwargs: {jsonl: my_task.jsonl}      # relative to this directory, or absolute
    test_split: test

    custom_dataset: !function local_data.load_saved
    dataset_kwargs: {saved: hellaswag}          # a save_to_disk directory, idem

Copy this file beside task YAMLs in another directory to use it there.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(jsonl: str, split: str = "test", **_metadata):
    """A DatasetDict {split: the records of `jsonl`}; lm-eval also passes the task's metadata."""
    import datasets

    path = HERE / jsonl  # an absolute `jsonl` stays itself
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: this task's data file is missing (megatrain's shipped tasks: "
            "python configs/eval/build_tasks.py writes theirs)"
        )
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})


def load_saved(saved: str, **_metadata):
    """The DatasetDict (or Dataset, as {"test": it}) that `save_to_disk` wrote to `saved`."""
    import datasets

    path = HERE / saved
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no dataset saved there (datasets' save_to_disk)")
    data = datasets.load_from_disk(str(path))
    return data if isinstance(data, datasets.DatasetDict) else datasets.DatasetDict({"test": data})
