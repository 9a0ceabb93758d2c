"""data_prep: raw text -> cleaned, deduplicated, tokenized Arrow shards (`megatrain prep`).

    from data_prep.launch import run_prep
    from data_prep.state import PrepOptions
    report = run_prep(PrepOptions(inputs=["raw/"], out="data/demo", vocab_size=4096))

Modules, bottom to top: readers, filters, dedup, tokenizer, recipe, workdir, progress, report,
comm (how ranks talk), global_dedup, state (what a rank knows), stages (per-unit work),
pipeline (one rank's stage sequence), launch (starting the ranks; `run_prep`).
"""
