"""data_prep: raw text -> cleaned, deduplicated, tokenized Arrow shards (`megatrain prep`).

    from data_prep import PrepOptions, run_prep
    report = run_prep(PrepOptions(inputs=["raw/"], out="data/demo", vocab_size=4096))

Modules, bottom to top: readers, filters, dedup, tokenizer, recipe, workdir, progress, report,
comm (how ranks talk), global_dedup, state (what a rank knows), stages (per-unit work),
pipeline (one rank's stage sequence), launch (starting the ranks; `run_prep`).
"""

import importlib

# Imported on first use: a worker (`python -m data_prep.launch`) must not find its module
# already imported by the package, and `import data_prep.filters` stays light.
_EXPORTS = {
    "run_prep": "data_prep.launch",
    "PrepOptions": "data_prep.state",
    "PrepError": "data_prep.state",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
