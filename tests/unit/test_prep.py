import gzip
import json

import numpy as np
import pytest

from data_prep.pipeline import PrepError, PrepOptions, run_prep
from data_prep.readers import InputError
from data_prep.tokenizer import FastEncoder, load_tokenizer, to_tiktoken
from megatrain.shards import Dataset
from tests.helpers import corpus_sample


def quiet(*_):
    pass


def test_prep_writes_a_dataset_the_trainer_can_read(tiny_dataset):
    ds = Dataset(tiny_dataset)
    report = json.loads((tiny_dataset / "report.json").read_text())
    assert ds.manifest.vocab_size == 512 and len(ds.shards) > 1
    assert report["docs_out"] == ds.manifest.num_documents == 120 and report["tokens"] == ds.num_tokens
    tok = load_tokenizer(tiny_dataset / "tokenizer.json")
    assert ds.manifest.tokenizer_sha256 and ds.manifest.eos_id == tok.token_to_id("<|endoftext|>")
    first = ds.shards[0].document(0)
    assert first[-1] == ds.manifest.eos_id and ds.manifest.eos_id not in first[:-1]
    text = tok.decode(first[:-1].tolist())
    assert len(text) > 100 and text.isprintable() or "\n" in text


def test_fast_encoder_gives_the_hf_ids(tiny_dataset, tmp_path):
    tok = load_tokenizer(tiny_dataset / "tokenizer.json")
    raw = corpus_sample(tmp_path)
    texts = [json.loads(line)["text"] for lang in ("en", "fr") for line in open(raw / f"{lang}.jsonl")]
    texts += ["l'été où « ça » s'arrête… 3,14 € — naïve café\t\n  \n", "  leading spaces", "émojis 🤖🚀 and CJK 中文"]
    fast = FastEncoder(tok, texts[:20])
    assert fast.backend == "tiktoken"
    reference = [np.array(e.ids + [fast.eos_id]) for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert all(np.array_equal(a, b) for a, b in zip(fast.encode(texts), reference))
    assert to_tiktoken(tok).decode(fast.encode(texts[-1:])[0][:-1].tolist()) == texts[-1]


def test_rerun_is_a_no_op_and_other_inputs_are_refused(tmp_path):
    raw = corpus_sample(tmp_path / "raw", docs_per_language=10)
    opts = PrepOptions(inputs=[str(raw)], out=str(tmp_path / "out"), vocab_size=300)
    run_prep(opts, log=quiet)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    messages = []
    run_prep(opts, log=messages.append)
    assert "already prepared" in messages[0]
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    with pytest.raises(PrepError, match="prepared from other inputs or options; choose another --out"):
        run_prep(PrepOptions(inputs=[str(raw)], out=str(tmp_path / "out"), vocab_size=301), log=quiet)


def test_bad_lines_are_counted_not_fatal(tmp_path):
    good = [{"text": f"Document number {i} talks about tokenizers and shards. " * 5} for i in range(30)]
    lines = [json.dumps(d) for d in good] + ["{broken json", json.dumps({"body": "no text field"}), ""]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_bytes(json.dumps({"text": "caf\xe9 " * 40}, ensure_ascii=False).encode("latin-1") + b"\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(("\n".join(json.dumps(d) for d in good[:5]) + "\n").encode())
    (tmp_path / "d.jsonl.gz").write_bytes((tmp_path / "c.jsonl.gz").read_bytes()[:-30])  # truncated archive
    (tmp_path / "e.txt").write_text("")
    report = run_prep(PrepOptions(inputs=[str(tmp_path)], out=str(tmp_path / "out"), vocab_size=300), log=quiet)
    assert report["rejected"]["malformed_json"] == 1 and report["rejected"]["missing_field"] == 1
    assert report["rejected"]["repaired"] == 1 and report["rejected"]["truncated_or_corrupt_archive"] == 1
    assert report["rejected"]["empty_file"] == 1
    locations = {s["location"] for s in report["reject_samples"]}
    assert f"{tmp_path / 'a.jsonl'}:31" in locations
    assert report["docs_out"] >= 36


def test_fatal_input_problems_name_the_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        run_prep(PrepOptions(inputs=[str(tmp_path / "nope")], out=str(tmp_path / "o")), log=quiet)
    (tmp_path / "empty.jsonl").write_text("{}\n")
    with pytest.raises(PrepError, match="no documents found"):
        run_prep(PrepOptions(inputs=[str(tmp_path / "empty.jsonl")], out=str(tmp_path / "o")), log=quiet)
