"""The prep report: DIR/report.json, DIR/rejects/*.jsonl and the table printed at the end.

Accounting, checked before the report is written: every record read is either a document in
the output or counted once, as rejected (could not become a document: malformed JSON, missing
field, too long), removed by a filter (or "empty" after normalization), or removed by a dedup
stage:   docs_in == docs_out + sum(rejected) + sum(removed).
Repairs (invalid UTF-8 replaced) keep the document and are counted apart; so are file-level
problems (empty file, truncated archive, binary or unreadable file), which are not records.

Bytes, checked too (`bytes.accounted`, see `data_prep.readers.ByteCounts`): the inputs' size
on disk is read + skipped (by reason), and what was read (decompressed) went into documents,
rejected records, blank lines or the partial record an archive's damage cut. `skipped_files`
lists each file skipped or damaged, by path, with its reason and bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from data_prep.readers import bytes_closes
from megatrain.files import atomic_write_text

STAGE_ORDER = ["empty", "length", "quality", "repetition", "language", "exact_dedup", "near_dedup"]


def build_report(
    scan_stats: list[dict],
    dedup: dict,
    tokens: int,
    docs_out: int,
    seconds: dict,
    bytes_in: int,
    shards: int,
    encoder: str,
    stages: list[str] = (),
) -> dict:
    """`stages`: the filters and dedup stages the recipe runs, listed in `removed` even at 0."""
    totals = {k: Counter() for k in ("rejected", "repaired", "file_problems", "removed", "reasons")}
    docs_in = 0
    counted = Counter()  # byte counters summed over units
    skipped, files = Counter(), []
    for s in scan_stats:
        docs_in += s["docs_in"]
        for k in totals:
            totals[k].update(s[k])
        b = s.get("bytes", {})  # absent in the markers of a prep started before byte accounting
        counted.update({k: v for k, v in b.items() if isinstance(v, int)})
        skipped.update(b.get("skipped", {}))
        files += b.get("files", [])
    byte_report = {
        "in": bytes_in,
        **{
            k: counted[k]
            for k in (
                "read",
                "decoded",
                "documents",
                "rejected",
                "blank",
                "partial",
                "invalid_utf8",
            )
        },
        "skipped": dict(sorted(skipped.items())),
    }
    byte_report["accounted"] = bytes_closes(byte_report, bytes_in)
    totals["removed"]["exact_dedup"] = dedup["exact"]
    totals["removed"]["near_dedup"] = dedup["near"]
    names = set(stages) | {k for k, n in totals["removed"].items() if n}
    removed = {k: totals["removed"][k] for k in sorted(names, key=_stage_key)}
    total_s = sum(seconds.values())
    report = {
        "docs_in": docs_in,
        "docs_out": docs_out,
        "tokens": tokens,
        "rejected": dict(sorted(totals["rejected"].items())),
        "rejected_total": sum(totals["rejected"].values()),
        "removed": removed,
        "removed_total": sum(removed.values()),
        "removed_reasons": dict(sorted(totals["reasons"].items())),
        "repaired": dict(sorted(totals["repaired"].items())),
        "file_problems": dict(sorted(totals["file_problems"].items())),
        "bytes_in": bytes_in,
        "bytes": byte_report,
        "skipped_files": files,
        "shards": shards,
        "encoder": encoder,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "seconds_total": round(total_s, 3),
        "tokens_per_s": round(
            tokens / max(seconds.get("tokenize", 0) + seconds.get("write", 0), 1e-9), 1
        ),
        "tokens_per_s_overall": round(tokens / max(total_s, 1e-9), 1),
        "mb_per_s": round(bytes_in / 1e6 / max(total_s, 1e-9), 3),
    }
    report["accounted"] = docs_in == docs_out + report["rejected_total"] + report["removed_total"]
    return report


def _stage_key(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER) - 2, name)


def write_rejects(
    out: Path, scan_stats: list[dict], dedup_samples: dict[str, list], limit: int
) -> dict[str, int]:
    """DIR/rejects/<stage>.jsonl: up to `limit` removed documents per stage, in input order, with
    the reason."""
    merged: dict[str, list] = {}
    for s in scan_stats:
        for stage, items in s["samples"].items():
            bucket = merged.setdefault(stage, [])
            bucket += items[: max(0, limit - len(bucket))]
    merged.update({k: v[:limit] for k, v in dedup_samples.items() if v})
    directory = out / "rejects"
    directory.mkdir(exist_ok=True)
    for old in directory.glob("*.jsonl"):
        if old.stem not in merged:
            old.unlink()
    for stage, items in merged.items():
        lines = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        atomic_write_text(directory / f"{stage}.jsonl", lines)
    return {k: len(v) for k, v in merged.items()}


def format_table(report: dict) -> str:
    """The stage-by-stage table printed at the end of a prep."""
    rows = [("documents in", report["docs_in"], "")]
    left = report["docs_in"]
    for kind, n in report["rejected"].items():
        left -= n
        rows.append((f"  rejected: {kind}", -n, left))
    for stage, n in report["removed"].items():
        left -= n
        rows.append((f"  removed: {stage}", -n, left))
    rows.append(("documents out", report["docs_out"], ""))
    extra = {
        **{f"repaired: {k}": v for k, v in report["repaired"].items()},
        **{f"file problem: {k}": v for k, v in report["file_problems"].items()},
    }
    width = max(len(name) for name in [*(r[0] for r in rows), *extra])
    lines = [f"{'stage':<{width}}  {'documents':>12}  {'left':>12}"]
    lines += [
        f"{name:<{width}}  {n:>12,}  {(f'{rest:,}' if rest != '' else ''):>12}"
        for name, n, rest in rows
    ]
    lines += [f"{name:<{width}}  {n:>12,}" for name, n in extra.items()]
    lines += _format_bytes(report)
    secs = report["seconds"]
    lines.append(
        f"tokens {report['tokens']:,} in {report['shards']} shard(s); "
        f"input {report['bytes_in'] / 1e6:,.1f} MB in {report['seconds_total']:.1f} s "
        f"({report['mb_per_s']:.2f} MB/s); "
        f"tokenize+write {report['tokens_per_s']:,.0f} tokens/s ({report['encoder']})"
    )
    lines.append("time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()))
    if not report["accounted"]:
        lines.append("WARNING: the counts do not add up; please report this as a bug")
    if not report["bytes"]["accounted"]:
        lines.append("WARNING: the byte counts do not add up; please report this as a bug")
    return "\n".join(lines)


SHOWN_FILES = 20
"""Skipped or damaged files named in the printed table (report.json lists them all)."""


def _format_bytes(report: dict) -> list[str]:
    """Where the input bytes went, and the files skipped or damaged."""
    b = report["bytes"]
    skipped = ", ".join(f"{k} {v:,}" for k, v in b["skipped"].items())
    lines = [
        f"bytes on disk: {b['in']:,} = {b['read']:,} read + {sum(b['skipped'].values()):,} "
        f"skipped" + (f" ({skipped})" if skipped else ""),
        f"bytes read (decompressed): {b['decoded']:,} = {b['documents']:,} in documents + "
        f"{b['rejected']:,} in rejected records + {b['blank']:,} blank + {b['partial']:,} in "
        "partial records cut by damage"
        + (f"; {b['invalid_utf8']:,} invalid UTF-8 bytes replaced" if b["invalid_utf8"] else ""),
    ]
    for f in report["skipped_files"][:SHOWN_FILES]:
        if "documents_kept" in f:  # damaged midway
            at = f"byte {f['decompressed_offset']:,}"
            if "compressed_offset" in f:
                at += f" (compressed {f['compressed_offset']:,})"
            lines.append(
                f"damaged {f['path']}: {f['reason']} at {at}; "
                f"{f['documents_kept']:,} documents before it kept, {f['partial_bytes']:,} bytes "
                f"of a partial record dropped, {f['bytes']:,} bytes skipped"
            )
        else:
            lines.append(f"skipped {f['path']} ({f['bytes']:,} bytes): {f['reason']}")
    if len(report["skipped_files"]) > SHOWN_FILES:
        more = len(report["skipped_files"]) - SHOWN_FILES
        lines.append(f"... and {more:,} more skipped or damaged file(s): see report.json")
    return lines
