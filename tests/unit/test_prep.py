import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from data_prep.launch import run_prep
from data_prep.readers import InputError
from data_prep.state import PrepError, PrepOptions
from data_prep.tokenizer import FastEncoder, TokenizerError, load_tokenizer, to_tiktoken
from megatrain.shards import Dataset
from tests.helpers import PLANTED_RECIPE, REPO, corpus_sample, planted_corpus


def quiet(*_):
    pass


def test_prep_writes_a_dataset_the_trainer_can_read(tiny_dataset):
    ds = Dataset(tiny_dataset)
    report = json.loads((tiny_dataset / "report.json").read_text())
    assert ds.manifest.vocab_size == 512 and len(ds.shards) > 1
    assert (
        report["docs_out"] == ds.manifest.num_documents == 120 and report["tokens"] == ds.num_tokens
    )
    tok = load_tokenizer(tiny_dataset / "tokenizer.json")
    assert ds.manifest.tokenizer_sha256 and ds.manifest.eos_id == tok.token_to_id("<|endoftext|>")
    first = ds.shards[0].document(0)
    assert first[-1] == ds.manifest.eos_id and ds.manifest.eos_id not in first[:-1]
    text = tok.decode(first[:-1].tolist())
    assert len(text) > 100 and text.isprintable() or "\n" in text
    assert not (tiny_dataset / ".prep-work").exists()  # intermediate files are gone once done


def test_fast_encoder_gives_the_hf_ids(tiny_dataset, tmp_path):
    tok = load_tokenizer(tiny_dataset / "tokenizer.json")
    raw = corpus_sample(tmp_path)
    texts = [
        json.loads(line)["text"] for lang in ("en", "fr") for line in open(raw / f"{lang}.jsonl")
    ]
    texts += [
        "l'été où « ça » s'arrête… 3,14 € — naïve café\t\n  \n",
        "  leading spaces",
        "émojis 🤖🚀 and CJK 中文",
        "a typed <|endoftext|> is text, not a document boundary",
    ]
    fast = FastEncoder(tok, texts[:20])
    assert fast.backend == "tiktoken"
    reference = [
        np.array(e.ids + [fast.eos_id]) for e in tok.encode_batch(texts, add_special_tokens=False)
    ]
    assert all(np.array_equal(a, b) for a, b in zip(fast.encode(texts), reference))
    assert fast.eos_id not in fast.encode(texts[-1:])[0][:-1]
    assert to_tiktoken(tok).decode(fast.encode(texts[-2:-1])[0][:-1].tolist()) == texts[-2]


def test_rerun_is_a_no_op_and_other_inputs_are_refused(tmp_path):
    raw = corpus_sample(tmp_path / "raw", docs_per_language=10)
    opts = PrepOptions(inputs=[str(raw)], out=str(tmp_path / "out"), vocab_size=300)
    run_prep(opts, log=quiet)

    def files():
        return {
            p.name: p.stat().st_mtime_ns
            for p in (tmp_path / "out").iterdir()
            if p.name != ".prep.lock"
        }

    before = files()
    messages = []
    run_prep(opts, log=messages.append)
    assert "already prepared" in messages[0]
    assert before == files()
    with pytest.raises(
        PrepError, match="prepared from other inputs or options; choose another --out"
    ):
        run_prep(
            PrepOptions(inputs=[str(raw)], out=str(tmp_path / "out"), vocab_size=301), log=quiet
        )


def test_planted_corpus_is_fully_accounted_for(tmp_path):
    """Every input record ends up in the output or in exactly one counter; duplicates planted in
    other files than their originals are removed once; each filter removes its spam document."""
    expected = planted_corpus(tmp_path / "raw")
    (tmp_path / "recipe.yaml").write_text(PLANTED_RECIPE)
    report = run_prep(
        PrepOptions(
            inputs=[str(tmp_path / "raw")],
            out=str(tmp_path / "out"),
            recipe=str(tmp_path / "recipe.yaml"),
        ),
        log=quiet,
    )
    assert (
        report["docs_in"] == report["docs_out"] + report["rejected_total"] + report["removed_total"]
    )
    assert (
        report["accounted"]
        and report["docs_out"] == Dataset(tmp_path / "out").manifest.num_documents
    )
    assert report["removed"]["exact_dedup"] == expected["exact"]
    assert report["removed"]["near_dedup"] == expected["near"]
    assert report["rejected"] == expected["rejected"]
    assert report["repaired"] == expected["repaired"]
    assert report["file_problems"] == expected["file_problems"]
    for stage, location in expected["spam"].items():
        assert report["removed"][stage] == 1, stage
        rejects = [
            json.loads(line) for line in open(tmp_path / "out" / "rejects" / f"{stage}.jsonl")
        ]
        assert [r["location"] for r in rejects] == [location] and rejects[0]["reason"].startswith(
            stage
        )
    dups = [json.loads(line) for line in open(tmp_path / "out" / "rejects" / "exact_dedup.jsonl")]
    assert dups[0]["location"].endswith("b.jsonl:9") and dups[0]["reason"].endswith("a.jsonl:3")
    bad = {
        r["location"].replace(str(tmp_path / "raw") + "/", ""): r["reason"].split(":")[0]
        for r in map(json.loads, open(tmp_path / "out" / "rejects" / "input.jsonl"))
    }
    truncated = [k for k in bad if k.startswith("j.jsonl.gz:")]
    assert len(truncated) == 1 and bad.pop(truncated[0]) == "truncated_or_corrupt_archive"
    assert bad == {
        "a.jsonl:10": "malformed_json",
        "a.jsonl:11": "missing_field",
        "f.parquet:6": "missing_field",
        "i-empty.jsonl": "empty_file",
        "k-huge.jsonl:1": "too_long",
        "l-noise.txt": "binary_file",
        "m-link.jsonl": "unreadable",
    }
    assert report["tokens"] > 0 and report["tokens_per_s"] > 0 and report["workers"] == 1
    raw = [p for p in (tmp_path / "raw").iterdir() if p.exists()]  # not the dangling link
    assert (
        report["bytes"]["in"] == sum(p.stat().st_size for p in raw) and report["bytes"]["accounted"]
    )
    skipped = {Path(f["path"]).name: f for f in report["skipped_files"]}
    assert sorted(skipped) == ["j.jsonl.gz", "l-noise.txt", "m-link.jsonl"]
    assert skipped["j.jsonl.gz"]["documents_kept"] > 0  # the whole ones before the damage
    assert report["bytes"]["skipped"]["binary_file"] == 1 << 16


def test_bad_lines_are_counted_not_fatal(tmp_path):
    good = [
        {"text": f"Document number {i} talks about tokenizers and shards. " * 5} for i in range(30)
    ]
    lines = [json.dumps(d) for d in good] + [
        "{broken json",
        json.dumps({"body": "no text field"}),
        "",
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_bytes(
        json.dumps({"text": "caf\xe9 " * 40}, ensure_ascii=False).encode("latin-1") + b"\n"
    )
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(("\n".join(json.dumps(d) for d in good[:5]) + "\n").encode())
    (tmp_path / "d.jsonl.gz").write_bytes(
        (tmp_path / "c.jsonl.gz").read_bytes()[:-30]
    )  # truncated archive
    (tmp_path / "e.txt").write_text("")
    report = run_prep(
        PrepOptions(inputs=[str(tmp_path)], out=str(tmp_path / "out"), vocab_size=300), log=quiet
    )
    assert report["rejected"] == {"malformed_json": 1, "missing_field": 1}
    assert report["repaired"] == {"invalid_utf8": 1}
    assert report["bytes"]["invalid_utf8"] == 40  # b.jsonl: "caf\xe9 " * 40 in Latin-1
    assert report["file_problems"] == {"truncated_or_corrupt_archive": 1, "empty_file": 1}
    # c.jsonl.gz holds copies of a.jsonl's first 5 documents, and so do the whole documents
    # before the cut of d.jsonl.gz: exact dedup removes them
    [cut] = report["skipped_files"]
    assert cut["path"] == str(tmp_path / "d.jsonl.gz") and cut["documents_kept"] == 2
    assert report["removed"] == {"empty": 0, "exact_dedup": 7} and report["docs_out"] == 31
    assert report["docs_in"] == report["docs_out"] + 2 + 7
    locations = [
        json.loads(line)["location"] for line in open(tmp_path / "out" / "rejects" / "input.jsonl")
    ]
    assert f"{tmp_path / 'a.jsonl'}:31" in locations


def test_fatal_problems_name_the_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        run_prep(PrepOptions(inputs=[str(tmp_path / "nope")], out=str(tmp_path / "o")), log=quiet)
    (tmp_path / "empty.jsonl").write_text("{}\n")
    with pytest.raises(PrepError, match="no documents left"):
        run_prep(
            PrepOptions(inputs=[str(tmp_path / "empty.jsonl")], out=str(tmp_path / "o")), log=quiet
        )
    assert json.loads((tmp_path / "o" / "report.json").read_text())["rejected"] == {
        "missing_field": 1
    }
    (tmp_path / "bad-tokenizer.json").write_text("{not a tokenizer")
    corpus_sample(tmp_path / "raw", docs_per_language=2)
    with pytest.raises(TokenizerError, match="bad-tokenizer.json is not a valid HF tokenizer.json"):
        run_prep(
            PrepOptions(
                inputs=[str(tmp_path / "raw")],
                out=str(tmp_path / "o2"),
                tokenizer=str(tmp_path / "bad-tokenizer.json"),
            ),
            log=quiet,
        )
    assert not (tmp_path / "o2" / ".prep-work").exists()  # stopped before any work


def test_given_tokenizer_is_used_and_its_hash_recorded(tiny_dataset, tmp_path):
    raw = corpus_sample(tmp_path / "raw", docs_per_language=5)
    run_prep(
        PrepOptions(
            inputs=[str(raw)],
            out=str(tmp_path / "o"),
            tokenizer=str(tiny_dataset / "tokenizer.json"),
            recipe=str(REPO / "configs" / "data" / "minimal.yaml"),
        ),
        log=quiet,
    )
    ds = Dataset(tmp_path / "o")
    assert ds.manifest.tokenizer_sha256 == Dataset(tiny_dataset).manifest.tokenizer_sha256
    assert (tmp_path / "o" / "tokenizer.json").read_bytes() == (
        tiny_dataset / "tokenizer.json"
    ).read_bytes()


def test_binary_dangling_and_truncated_inputs_are_skipped_by_name_and_every_byte_counted(tmp_path):
    raw = corpus_sample(tmp_path / "raw", docs_per_language=10)  # en.jsonl, fr.jsonl: 20 docs
    texts = [json.loads(line)["text"] for line in open(raw / "en.jsonl")]
    (raw / "noise.txt").write_bytes(np.random.default_rng(0).bytes(1 << 20))
    os.symlink(tmp_path / "moved.jsonl", raw / "link.jsonl")
    with gzip.open(raw / "more.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t + " (copy two)"}) + "\n" for t in texts[:6]))
    whole = (raw / "more.jsonl.gz").read_bytes()
    (raw / "more.jsonl.gz").write_bytes(whole[: len(whole) * 2 // 3])
    printed = []
    report = run_prep(
        PrepOptions(inputs=[str(raw)], out=str(tmp_path / "out"), vocab_size=300),
        log=printed.append,
    )
    skipped = {os.path.basename(f["path"]): f for f in report["skipped_files"]}
    assert skipped["noise.txt"]["reason"].startswith("binary_file: NUL byte")
    assert skipped["noise.txt"]["bytes"] == 1 << 20
    assert (
        skipped["link.jsonl"]["reason"] == f"unreadable: dangling symlink to {tmp_path}/moved.jsonl"
    )
    kept = skipped["more.jsonl.gz"]["documents_kept"]
    assert 0 < kept < 6 and skipped["more.jsonl.gz"]["partial_bytes"] > 0
    assert report["file_problems"] == {
        "binary_file": 1,
        "truncated_or_corrupt_archive": 1,
        "unreadable": 1,
    }
    # the binary file is no document: 20 + the whole documents of the cut archive, no more
    assert report["docs_in"] == report["docs_out"] == 20 + kept
    assert Dataset(tmp_path / "out").manifest.num_documents == 20 + kept
    b = report["bytes"]
    assert b["in"] == sum(p.stat().st_size for p in raw.iterdir() if p.exists())
    assert b["skipped"]["binary_file"] == 1 << 20 and b["partial"] > 0 and b["accounted"]
    assert b["in"] == b["read"] + sum(b["skipped"].values())
    assert b["decoded"] == b["documents"] + b["rejected"] + b["blank"] + b["partial"]
    table = printed[-1]
    assert f"skipped {raw / 'noise.txt'} (1,048,576 bytes): binary_file: NUL byte" in table
    assert f"skipped {raw / 'link.jsonl'} (0 bytes): unreadable: dangling symlink" in table
    assert f"damaged {raw / 'more.jsonl.gz'}: truncated_or_corrupt_archive" in table
    rejects = [json.loads(line) for line in open(tmp_path / "out" / "rejects" / "input.jsonl")]
    assert {r["location"] for r in rejects} >= {str(raw / "noise.txt"), str(raw / "link.jsonl")}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_an_unreadable_file_in_a_directory_is_skipped_by_name(tmp_path):
    raw = corpus_sample(tmp_path / "raw", docs_per_language=5)
    (raw / "secret.jsonl").write_text(json.dumps({"text": "hidden"}) + "\n")
    (raw / "secret.jsonl").chmod(0)
    report = run_prep(
        PrepOptions(inputs=[str(raw)], out=str(tmp_path / "out"), vocab_size=300), log=quiet
    )
    [skipped] = report["skipped_files"]
    assert skipped == {
        "path": str(raw / "secret.jsonl"),
        "reason": "unreadable: permission denied",
        "bytes": (raw / "secret.jsonl").stat().st_size,
    }
    assert report["bytes"]["skipped"] == {"unreadable": skipped["bytes"]}
    assert report["bytes"]["accounted"] and report["docs_out"] == 10
