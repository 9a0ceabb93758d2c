"""`megatrain prep`: raw text in, a dataset directory (manifest, tokenizer, Arrow shards, report) out.

    plan -> scan (read, normalize, filter; per unit) -> global dedup -> tokenizer (train or load)
         -> tokenize (per unit) -> write shards (per shard) -> report, manifest.json last

Every rank runs this same function (`run_prep`): 1 process, `--workers N` local processes,
MPI ranks (`mpiexec -n N`, `srun --mpi=pmi2`), Slurm array tasks or plain srun tasks. Units of
work are dealt to ranks by size; the collective steps go through a `data_prep.comm` object.
Each unit's results are committed by a marker, so a rerun of the same command after a crash
(kill -9 included) skips what was done and ends with the same bytes as an uninterrupted run,
and so does a run with any other number of workers. See data_prep.workdir for the files.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import megatrain
from data_prep import stages
from data_prep.global_dedup import exact_duplicates, near_duplicates
from data_prep.progress import Progress
from data_prep.readers import Unit, expand_inputs, plan_units
from data_prep.recipe import Recipe, load_recipe
from data_prep.report import build_report, format_table, write_rejects
from data_prep.tokenizer import EOS, FastEncoder, load_tokenizer, train_bpe
from data_prep.workdir import WorkDir, crash_point, write_json
from megatrain.dist import agree
from megatrain.errors import MegatrainError
from megatrain.files import atomic_path, atomic_write_bytes, read_json, sha256_file
from megatrain.shards import MANIFEST_FILE, Manifest, ShardInfo, token_dtype


class PrepError(MegatrainError):
    """The job cannot produce a dataset (no documents, output in use); the message says what to do."""


@dataclass
class PrepOptions:
    inputs: list[str]
    out: str
    recipe: str | None = None
    vocab_size: int | None = None
    tokenizer: str | None = None
    text_field: str | None = None
    shard_tokens: int | None = None
    workers: int = 1
    force: bool = False
    keep_work: bool = False
    tokenizer_sample_chars: int | None = None
    seed: int | None = None


def resolve_recipe(opts: PrepOptions) -> Recipe:
    """The recipe file (or the default one) with the command-line flags applied on top."""
    recipe = load_recipe(opts.recipe)
    for value, section, key in [
        (opts.vocab_size, recipe.tokenizer, "vocab_size"),
        (opts.tokenizer, recipe.tokenizer, "path"),
        (opts.tokenizer_sample_chars, recipe.tokenizer, "sample_chars"),
        (opts.text_field, recipe.read, "text_field"),
        (opts.shard_tokens, recipe.output, "shard_tokens"),
        (opts.seed, recipe, "seed"),
    ]:
        if value is not None:
            setattr(section, key, value)
    return recipe


def _fingerprint(recipe: Recipe, files: list[Path]) -> dict:
    """What the output depends on. Not the number of workers: the output is the same for any."""
    rec = recipe.as_dict()
    if recipe.tokenizer.path:
        rec["tokenizer"]["path"] = sha256_file(recipe.tokenizer.path)
    rec.pop("report")
    return json.loads(
        json.dumps(
            {
                "inputs": [
                    [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files
                ],
                "recipe": rec,
                "format": "megatrain-prep-1",
            }
        )
    )


def assign_units(units: list[Unit], size: int) -> list[list[int]]:
    """Biggest unit first to the least loaded rank: balanced, and a pure function of the plan."""
    loads, owned = [0] * size, [[] for _ in range(size)]
    for u in sorted(units, key=lambda u: (-u.size, u.index)):
        r = min(range(size), key=lambda i: (loads[i], i))
        loads[r] += u.size + 1
        owned[r].append(u.index)
    return [sorted(o) for o in owned]


def _clear_outputs(out: Path) -> None:
    for p in [
        *out.glob("shard-*.arrow"),
        out / MANIFEST_FILE,
        out / "tokenizer.json",
        out / "report.json",
    ]:
        p.unlink(missing_ok=True)
    stages.remove_tree(out / "rejects")


# ----------------------------------------------------------------------------- setup (rank 0)


def _setup(opts: PrepOptions, recipe: Recipe, work: WorkDir, log) -> dict:
    """Decide what this run does: {"done": report} or {"plan": ...}; raises on a fatal problem."""
    files = expand_inputs(opts.inputs)
    if recipe.tokenizer.path:
        load_tokenizer(recipe.tokenizer.path)  # fail now, not after hours of filtering
    fingerprint = _fingerprint(recipe, files)
    out = work.out
    if (out / MANIFEST_FILE).exists() and not opts.force:
        done = Manifest.read(out)
        if done.extra.get("fingerprint") == fingerprint:
            log(
                f"{out} is already prepared from these inputs ({done.num_tokens:,} tokens); nothing to do"
            )
            return {"done": json.loads((out / "report.json").read_text())}
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
        log(f"resuming the unfinished prep in {out}")
        return {"plan": plan}
    if opts.force:
        stages.remove_tree(work.root)
    _clear_outputs(out)
    work.make()
    units = plan_units(files, int(recipe.read.unit_mb * 2**20))
    plan = {
        "fingerprint": fingerprint,
        "units": [u.as_dict() for u in units],
        "recipe": recipe.as_dict(),
        "bytes_in": sum(f.stat().st_size for f in files),
    }
    write_json(work.plan, plan)
    return {"plan": read_json(work.plan)}  # as a resumed run will see it (key order included)


# ----------------------------------------------------------------------------- the run, on every rank


def run_prep(opts: PrepOptions, log=print) -> dict:
    """Run (this rank of) a prep; see data_prep.launch for how ranks are started."""
    from data_prep.launch import run_prep as launch

    return launch(opts, log)


def _run(opts: PrepOptions, comm, log) -> dict:
    seconds: dict[str, float] = {}
    recipe = resolve_recipe(opts)
    work = WorkDir(opts.out)
    quiet = (lambda *_: None) if comm.rank else log
    setup = agree(lambda: _setup(opts, recipe, work, log), comm, root=0)
    if "done" in setup:
        return setup["done"]
    plan = setup["plan"]
    units = [Unit(**u) for u in plan["units"]]
    mine = assign_units(units, comm.size)[comm.rank]
    progress_dir = work.root / "progress"
    quiet(
        f"prep: {len(units)} unit(s) of work from {plan['bytes_in'] / 1e6:,.1f} MB on {comm.size} worker(s) ({comm.kind})"
    )

    # -- scan: read, normalize, filter
    t = time.perf_counter()
    filters, hasher = recipe.build_filters(), stages.minhasher(recipe)
    progress = Progress(progress_dir, "scan", comm.rank, comm.size, len(units), comm.rank == 0, log)
    kept = {}
    for u in mine:
        stats = stages.unit_done(work, u, "scan") or stages.scan_unit(
            units[u], recipe, filters, hasher, work, progress
        )
        kept[u] = stats["kept"]
        progress.add(units=1)
    kept = {u: n for part in comm.allgather(kept) for u, n in part.items()}
    progress.close()
    counts = np.array([kept[u] for u in range(len(units))], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    seconds["scan"] = time.perf_counter() - t
    if offsets[-1] == 0:
        agree(
            lambda: _final_report(work, plan, units, recipe, {}, 0, 0, 0, seconds, "-", quiet),
            comm,
            root=0,
        )
        error = PrepError(
            f"no documents left in {', '.join(opts.inputs)} after reading and filtering; see "
            f"{work.out / 'report.json'} and {work.out / 'rejects'} for why"
        )
        error.shared = True  # every rank saw the same counts
        raise error

    # -- global dedup
    t = time.perf_counter()
    if not agree(work.dedup.exists, comm, root=0):
        _dedup(comm, recipe, work, mine, offsets)
    comm.barrier("dedup")
    with np.load(work.dedup) as z:
        dedup = {k: z[k] for k in z.files}
    dropped = np.union1d(dedup["exact_drop"], dedup["near_drop"])
    seconds["dedup"] = time.perf_counter() - t
    quiet(
        f"dedup: {len(dedup['exact_drop']):,} exact and {len(dedup['near_drop']):,} near duplicates removed"
    )

    # -- tokenizer: train on a sample of what is left, or load; rank 0 picks the encoder for all
    t = time.perf_counter()
    backend = agree(lambda: _tokenizer(recipe, work, units, offsets, dropped, quiet), comm, root=0)
    tok = load_tokenizer(work.out / "tokenizer.json")
    encoder = FastEncoder(tok, [], backend=backend)
    dtype = token_dtype(tok.get_vocab_size())
    seconds["tokenizer"] = time.perf_counter() - t

    # -- tokenize
    t = time.perf_counter()
    progress = Progress(
        progress_dir, "tokenize", comm.rank, comm.size, len(units), comm.rank == 0, log
    )
    for u in mine:
        if not stages.unit_done(work, u, "tok"):
            stages.tokenize_unit(u, int(offsets[u]), dropped, encoder, dtype, work, progress)
        progress.add(units=1)
    comm.barrier("tokenize")
    progress.close()
    seconds["tokenize"] = time.perf_counter() - t

    # -- write shards
    t = time.perf_counter()
    layout = stages.shard_layout(work, list(range(len(units))), recipe.output.shard_tokens)
    infos = {
        p.index: asdict(stages.write_layout_shard(p, work, tok.get_vocab_size(), dtype))
        for p in layout
        if p.index % comm.size == comm.rank
    }
    infos = {i: info for part in comm.allgather(infos) for i, info in part.items()}
    shards = [ShardInfo(**infos[i]) for i in range(len(layout))]
    seconds["write"] = time.perf_counter() - t

    def finish():
        report = _final_report(
            work,
            plan,
            units,
            recipe,
            dedup,
            sum(s.num_tokens for s in shards),
            sum(s.num_documents for s in shards),
            len(shards),
            seconds,
            encoder.backend,
            quiet,
            workers=comm.size,
        )
        crash_point("manifest")
        tok_path = work.out / "tokenizer.json"
        Manifest(
            vocab_size=tok.get_vocab_size(),
            eos_id=tok.token_to_id(EOS),
            tokenizer_file=tok_path.name,
            tokenizer_sha256=sha256_file(tok_path),
            shards=shards,
            extra={
                "fingerprint": plan["fingerprint"],
                "created_by": f"megatrain {megatrain.__version__}",
            },
        ).write(work.out)
        return report

    return agree(finish, comm, root=0)


def _dedup(comm, recipe: Recipe, work: WorkDir, mine: list[int], offsets: np.ndarray) -> None:
    keys = {u: stages.read_keys(work, u) for u in mine}
    gids = {u: np.arange(offsets[u], offsets[u + 1], dtype=np.int64) for u in mine}
    empty = np.zeros(0, np.int64)
    exact_drop, exact_of = empty, empty
    if recipe.dedup.exact:
        exact_drop, exact_of = exact_duplicates(comm, [(keys[u]["hashes"], gids[u]) for u in mine])
    near_drop, near_of = empty, empty
    if recipe.dedup.near.enabled:
        local = [
            (keys[u]["bands"][keys[u]["has_shingles"]], gids[u][keys[u]["has_shingles"]])
            for u in mine
        ]
        near_drop, near_of = near_duplicates(comm, local, recipe.dedup.near.bands)
        not_exact = ~np.isin(near_drop, exact_drop)
        near_drop, near_of = near_drop[not_exact], near_of[not_exact]
    if comm.rank == 0:
        # a file object: given a path, np.savez would append ".npz" to it
        with atomic_path(work.dedup) as tmp, open(tmp, "wb") as f:
            np.savez(
                f, exact_drop=exact_drop, exact_of=exact_of, near_drop=near_drop, near_of=near_of
            )


def _tokenizer(recipe: Recipe, work: WorkDir, units: list[Unit], offsets, dropped, log) -> str:
    """Rank 0: make OUT/tokenizer.json (copy or train) and choose the encoder backend."""
    target = work.out / "tokenizer.json"
    done = work.root / "tokenizer.done"
    if recipe.tokenizer.path:
        with atomic_path(target) as tmp:
            shutil.copyfile(recipe.tokenizer.path, tmp)
    elif not done.exists():
        chars = sum(int(stages.read_keys(work, u.index)["chars"].sum()) for u in units)
        t = time.perf_counter()
        sample = stages.sample_texts(
            work,
            [u.index for u in units],
            offsets,
            dropped,
            recipe.tokenizer.sample_chars,
            chars,
            recipe.seed,
        )
        tok = train_bpe(
            sample,
            recipe.tokenizer.vocab_size,
            tuple(recipe.tokenizer.special_tokens),
            recipe.tokenizer.min_frequency,
        )
        with atomic_path(target) as tmp:
            tok.save(str(tmp))
        atomic_write_bytes(done, b"")
        log(
            f"trained a byte-level BPE of {tok.get_vocab_size():,} tokens in {time.perf_counter() - t:.1f} s"
        )
    tok = load_tokenizer(target)
    check, chars = [], 0  # the first kept documents, up to ~300k characters: HF is the slow side
    for text in stages.sample_texts(work, [u.index for u in units], offsets, dropped, 1, 1, 0):
        check.append(text)
        chars += len(text)
        if len(check) >= 200 or chars > 300_000:
            break
    return FastEncoder(tok, check).backend


def _final_report(
    work, plan, units, recipe, dedup, tokens, docs_out, n_shards, seconds, encoder, log, workers=1
) -> dict:
    scan = [stages.unit_done(work, u.index, "scan") for u in units]
    limit = recipe.report.reject_samples
    samples = {
        "exact_dedup": _dup_samples(
            work, dedup.get("exact_drop"), dedup.get("exact_of"), plan, limit, recipe
        ),
        "near_dedup": _dup_samples(
            work, dedup.get("near_drop"), dedup.get("near_of"), plan, limit, recipe
        ),
    }
    report = build_report(
        scan,
        {"exact": len(dedup.get("exact_drop", [])), "near": len(dedup.get("near_drop", []))},
        tokens,
        docs_out,
        seconds,
        plan["bytes_in"],
        n_shards,
        encoder,
        [
            "empty",
            *(f["name"] for f in recipe.filters),
            *(["exact_dedup"] if recipe.dedup.exact else []),
            *(["near_dedup"] if recipe.dedup.near.enabled else []),
        ],
    )
    report["workers"] = workers
    write_rejects(work.out, scan, samples, limit)
    write_json(work.out / "report.json", report)
    log(format_table(report))
    return report


def _dup_samples(work, drop, of, plan, limit, recipe) -> list[dict]:
    if drop is None or not len(drop):
        return []
    counts = [stages.unit_done(work, u["index"], "scan")["kept"] for u in plan["units"]]
    offsets = np.concatenate([[0], np.cumsum(counts)])

    def locate(gid):
        u = int(np.searchsorted(offsets, gid, side="right")) - 1
        return stages.doc_at(work, u, int(gid - offsets[u]))

    items = []
    for gid, orig in zip(drop[:limit], of[:limit]):
        text, source = locate(gid)
        items.append(
            {
                "location": source,
                "reason": f"duplicate of {locate(orig)[1]}",
                "text": text[: recipe.report.sample_chars],
            }
        )
    return items
