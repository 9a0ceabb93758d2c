"""One rank of `megatrain prep`: raw text in, a dataset directory (manifest, tokenizer, Arrow
shards, report) out.

    setup (rank 0) -> scan (read, normalize, filter; per unit) -> global dedup
        -> tokenizer (rank 0 trains or copies) -> tokenize (per unit) -> write shards (per shard)
        -> report, manifest.json last (rank 0)

Every rank runs `prepare_rank` with its `data_prep.comm.Comm` (see data_prep.launch for how the
ranks are started). Units of work are dealt to ranks by size; what rank 0 decides alone it hands
to all through `megatrain.dist.agree`, which also makes every rank fail if it failed. Each unit's
results are committed by a marker, so a rerun of the same command after a crash (kill -9
included) skips what was done and ends with the same bytes as an uninterrupted run, and so does
a run with any other number of workers. See data_prep.workdir for the files.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

import megatrain
from data_prep import stages
from data_prep.comm import Comm
from data_prep.global_dedup import exact_duplicates, near_duplicates
from data_prep.progress import Progress
from data_prep.readers import Unit, expand_inputs, file_size, plan_units
from data_prep.recipe import Recipe
from data_prep.report import build_report, format_table, write_rejects
from data_prep.state import PrepError, PrepOptions, PrepState, resolve_recipe
from data_prep.tokenizer import EOS, FastEncoder, load_tokenizer, train_bpe
from data_prep.workdir import crash_point, write_json
from megatrain.dist import agree
from megatrain.files import atomic_path, atomic_write_bytes, read_json, sha256_file
from megatrain.shards import MANIFEST_FILE, Manifest, ShardInfo, token_dtype


def prepare_rank(opts: PrepOptions, comm: Comm, log=print) -> dict:
    """Run this rank's part of a prep; every rank returns the report (DIR/report.json)."""
    recipe = agree(lambda: resolve_recipe(opts), comm)
    state = PrepState(opts, recipe, comm, log)
    setup = agree(lambda: _setup(state), comm, root=0)
    if "done" in setup:
        return setup["done"]
    state.plan = setup["plan"]
    state.units = [Unit(**u) for u in state.plan["units"]]
    state.mine = assign_units(state.units, comm.size)[comm.rank]
    state.log(
        f"prep: {len(state.units)} unit(s) of work from {state.plan['bytes_in'] / 1e6:,.1f} MB "
        f"on {comm.size} worker(s) ({comm.kind})"
    )
    with state.timer("scan"):
        _scan(state)
    if state.offsets[-1] == 0:
        agree(lambda: _no_documents(state), comm, root=0)
    with state.timer("dedup"):
        _dedup(state)
    with state.timer("tokenizer"):
        _tokenizer(state)
    with state.timer("tokenize"):
        _tokenize(state)
    with state.timer("write"):
        shards = _write_shards(state)
    return agree(lambda: _finish(state, shards), comm, root=0)


def assign_units(units: list[Unit], size: int) -> list[list[int]]:
    """Biggest unit first to the least loaded rank: balanced, and a pure function of the plan."""
    loads, owned = [0] * size, [[] for _ in range(size)]
    for u in sorted(units, key=lambda u: (-u.size, u.index)):
        r = min(range(size), key=lambda i: (loads[i], i))
        loads[r] += u.size + 1
        owned[r].append(u.index)
    return [sorted(o) for o in owned]


# ----------------------------------------------------------------------------- setup (rank 0)


def _fingerprint(recipe: Recipe, files: list[Path]) -> dict:
    """What the output depends on. Not the number of workers: the output is the same for any."""
    rec = recipe.as_dict()
    if recipe.tokenizer.path:
        rec["tokenizer"]["path"] = sha256_file(recipe.tokenizer.path)
    rec.pop("report")
    stats = [f.stat() if f.exists() else f.lstat() for f in files]  # lstat: a dangling symlink
    inputs = [[str(f.resolve()), s.st_size, s.st_mtime_ns] for f, s in zip(files, stats)]
    return json.loads(json.dumps({"inputs": inputs, "recipe": rec, "format": "megatrain-prep-1"}))


def _setup(state: PrepState) -> dict:
    """Decide what this run does: {"done": report} or {"plan": ...}; raises on a fatal problem."""
    opts, recipe, work = state.opts, state.recipe, state.work
    files = expand_inputs(opts.inputs)
    if recipe.tokenizer.path:
        load_tokenizer(recipe.tokenizer.path)  # fail now, not after hours of filtering
    fingerprint = _fingerprint(recipe, files)
    out = work.out
    if (out / MANIFEST_FILE).exists() and not opts.force:
        done = Manifest.read(out)
        if done.extra.get("fingerprint") == fingerprint:
            state.log(
                f"{out} is already prepared from these inputs ({done.num_tokens:,} tokens); "
                "nothing to do"
            )
            return {"done": read_json(out / "report.json")}
        raise PrepError(
            f"{out} holds a dataset prepared from other inputs or options; choose another --out "
            "or pass --force to replace it"
        )
    if work.plan.exists() and not opts.force:
        plan = read_json(work.plan)
        if plan["fingerprint"] != fingerprint:
            raise PrepError(
                f"{out} holds an unfinished prep of other inputs or options; rerun that command to "
                "finish it, choose another --out, or pass --force to start over"
            )
        state.log(f"resuming the unfinished prep in {out}")
        return {"plan": plan}
    if opts.force:
        shutil.rmtree(work.root, ignore_errors=True)
    for name in ["shard-*.arrow", MANIFEST_FILE, "tokenizer.json", "report.json"]:
        for p in out.glob(name):
            p.unlink()
    shutil.rmtree(out / "rejects", ignore_errors=True)
    work.make()
    units = plan_units(files, int(recipe.read.unit_mb * 2**20))
    plan = {
        "fingerprint": fingerprint,
        "units": [u.as_dict() for u in units],
        "recipe": recipe.as_dict(),
        "bytes_in": sum(file_size(f) for f in files),
    }
    write_json(work.plan, plan)
    return {"plan": read_json(work.plan)}  # as a resumed run will see it (key order included)


# ----------------------------------------------------------------------------- stages


def _scan(state: PrepState) -> None:
    """Read, clean and filter this rank's units; every rank learns where each unit's kept
    documents start in the global order (state.offsets)."""
    comm, work = state.comm, state.work
    progress = Progress(
        work.progress, "scan", comm.rank, comm.size, len(state.units), comm.rank == 0, state.log
    )
    kept = {}
    for u in state.mine:
        stats = stages.unit_done(work, u, "scan") or stages.scan_unit(
            state, state.units[u], progress
        )
        kept[u] = stats["kept"]
        progress.add(units=1)
    kept = {u: n for part in comm.allgather(kept) for u, n in part.items()}
    progress.close()
    counts = np.array([kept[u] for u in range(len(state.units))], dtype=np.int64)
    state.offsets = np.concatenate([[0], np.cumsum(counts)])


def _no_documents(state: PrepState) -> None:
    """Rank 0: write the report, which says where the documents went, then fail."""
    _final_report(state, [])
    raise PrepError(
        f"no documents left in {', '.join(state.opts.inputs)} after reading and filtering; see "
        f"{state.work.out / 'report.json'} and {state.work.out / 'rejects'} for why"
    )


def _dedup(state: PrepState) -> None:
    """The global dedup over all ranks (once: its result is committed as dedup.npz)."""
    comm, work = state.comm, state.work
    if not agree(work.dedup.exists, comm, root=0):
        _global_dedup(state)
    comm.barrier("dedup")
    with np.load(work.dedup) as z:
        state.dedup = {k: z[k] for k in z.files}
    state.dropped = np.union1d(state.dedup["exact_drop"], state.dedup["near_drop"])
    state.log(
        f"dedup: {len(state.dedup['exact_drop']):,} exact and "
        f"{len(state.dedup['near_drop']):,} near duplicates removed"
    )


def _global_dedup(state: PrepState) -> None:
    recipe, offsets, mine = state.recipe, state.offsets, state.mine
    keys = {u: stages.read_keys(state.work, u) for u in mine}
    gids = {u: np.arange(offsets[u], offsets[u + 1], dtype=np.int64) for u in mine}
    empty = np.zeros(0, np.int64)
    exact_drop, exact_of = empty, empty
    if recipe.dedup.exact:
        local = [(keys[u]["hashes"], gids[u]) for u in mine]
        exact_drop, exact_of = exact_duplicates(state.comm, local)
    near_drop, near_of = empty, empty
    if recipe.dedup.near.enabled:
        local = [
            (keys[u]["bands"][keys[u]["has_shingles"]], gids[u][keys[u]["has_shingles"]])
            for u in mine
        ]
        near_drop, near_of = near_duplicates(state.comm, local, recipe.dedup.near.bands)
        not_exact = ~np.isin(near_drop, exact_drop)
        near_drop, near_of = near_drop[not_exact], near_of[not_exact]
    if state.comm.rank == 0:
        # a file object: given a path, np.savez would append ".npz" to it
        with atomic_path(state.work.dedup) as tmp, open(tmp, "wb") as f:
            np.savez(
                f, exact_drop=exact_drop, exact_of=exact_of, near_drop=near_drop, near_of=near_of
            )


def _tokenizer(state: PrepState) -> None:
    """Rank 0 writes OUT/tokenizer.json and picks the encoder backend; every rank loads both."""
    backend = agree(lambda: _make_tokenizer(state), state.comm, root=0)
    state.tok = load_tokenizer(state.work.out / "tokenizer.json")
    state.encoder = FastEncoder(state.tok, [], backend=backend)
    state.dtype = token_dtype(state.tok.get_vocab_size())


def _make_tokenizer(state: PrepState) -> str:
    """Rank 0: copy or train OUT/tokenizer.json; returns the encoder backend for all ranks."""
    config, work = state.recipe.tokenizer, state.work
    target, done = work.out / "tokenizer.json", work.root / "tokenizer.done"
    if config.path:
        with atomic_path(target) as tmp:
            shutil.copyfile(config.path, tmp)
    elif not done.exists():
        start = time.perf_counter()
        sample = stages.sample_texts(state)
        tok = train_bpe(
            sample, config.vocab_size, tuple(config.special_tokens), config.min_frequency
        )
        with atomic_path(target) as tmp:
            tok.save(str(tmp))
        atomic_write_bytes(done, b"")
        state.log(
            f"trained a byte-level BPE of {tok.get_vocab_size():,} tokens in "
            f"{time.perf_counter() - start:.1f} s"
        )
    check, chars = [], 0  # the first kept documents, up to ~300k characters: HF is the slow side
    for _, text in stages.kept_docs(state, range(len(state.units))):
        check.append(text)
        chars += len(text)
        if len(check) >= 200 or chars > 300_000:
            break
    return FastEncoder(load_tokenizer(target), check).backend


def _tokenize(state: PrepState) -> None:
    comm, work = state.comm, state.work
    progress = Progress(
        work.progress, "tokenize", comm.rank, comm.size, len(state.units), comm.rank == 0, state.log
    )
    for u in state.mine:
        if not stages.unit_done(work, u, "tok"):
            stages.tokenize_unit(state, u, progress)
        progress.add(units=1)
    comm.barrier("tokenize")
    progress.close()


def _write_shards(state: PrepState) -> list[ShardInfo]:
    """Shard i is written by rank i % size; every rank gets the manifest entries of all."""
    comm = state.comm
    layout = stages.shard_layout(
        state.work, list(range(len(state.units))), state.recipe.output.shard_tokens
    )
    infos = {
        p.index: asdict(stages.write_layout_shard(state, p))
        for p in layout
        if p.index % comm.size == comm.rank
    }
    infos = {i: info for part in comm.allgather(infos) for i, info in part.items()}
    return [ShardInfo(**infos[i]) for i in range(len(layout))]


# ----------------------------------------------------------------------------- the end (rank 0)


def _finish(state: PrepState, shards: list[ShardInfo]) -> dict:
    """Rank 0: the report, then manifest.json, the dataset's completion marker, last."""
    report = _final_report(state, shards)
    crash_point("manifest")
    tok_path = state.work.out / "tokenizer.json"
    Manifest(
        vocab_size=state.tok.get_vocab_size(),
        eos_id=state.tok.token_to_id(EOS),
        tokenizer_file=tok_path.name,
        tokenizer_sha256=sha256_file(tok_path),
        shards=shards,
        extra={
            "fingerprint": state.plan["fingerprint"],
            "created_by": f"megatrain {megatrain.__version__}",
        },
    ).write(state.work.out)
    return report


def _final_report(state: PrepState, shards: list[ShardInfo]) -> dict:
    """Write DIR/report.json and DIR/rejects/, print the table; `shards` is [] on failure."""
    recipe, work, dedup = state.recipe, state.work, state.dedup
    scan = [stages.unit_done(work, u.index, "scan") for u in state.units]
    samples = {
        stage: _dup_samples(state, dedup.get(f"{kind}_drop"), dedup.get(f"{kind}_of"))
        for stage, kind in [("exact_dedup", "exact"), ("near_dedup", "near")]
    }
    report = build_report(
        scan,
        {"exact": len(dedup.get("exact_drop", [])), "near": len(dedup.get("near_drop", []))},
        sum(s.num_tokens for s in shards),
        sum(s.num_documents for s in shards),
        state.timer.seconds,
        state.plan["bytes_in"],
        len(shards),
        state.encoder.backend if state.encoder else "-",
        [
            "empty",
            *(f["name"] for f in recipe.filters),
            *(["exact_dedup"] if recipe.dedup.exact else []),
            *(["near_dedup"] if recipe.dedup.near.enabled else []),
        ],
    )
    report["workers"] = state.comm.size
    write_rejects(work.out, scan, samples, recipe.report.reject_samples)
    write_json(work.out / "report.json", report)
    state.log(format_table(report))
    return report


def _dup_samples(state: PrepState, drop, of) -> list[dict]:
    """Rejects samples of a dedup stage: where each removed document was, and what it copies."""
    if drop is None or not len(drop):
        return []
    offsets, limit = state.offsets, state.recipe.report.reject_samples

    def locate(gid):
        u = int(np.searchsorted(offsets, gid, side="right")) - 1
        return stages.doc_at(state.work, u, int(gid - offsets[u]))

    items = []
    for gid, orig in zip(drop[:limit], of[:limit]):
        text, source = locate(gid)
        items.append(
            {
                "location": source,
                "reason": f"duplicate of {locate(orig)[1]}",
                "text": text[: state.recipe.report.sample_chars],
            }
        )
    return items
