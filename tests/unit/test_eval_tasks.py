"""The shipped lm-eval tasks (configs/eval/): their data is what build_tasks.py makes from the
bundled corpus, byte for byte, and lm-eval finds the tasks and their data from any directory."""

import gzip
import importlib.util
import json

import pytest

from tests.helpers import CORPUS, REPO

TASK_DIR = REPO / "configs" / "eval"
LANGUAGES = ("fr", "en")


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"configs_eval_{name}", TASK_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = script("build_tasks")


def committed(lang: str) -> list[dict]:
    text = (TASK_DIR / f"megatrain_lastword_{lang}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("lang", LANGUAGES)
def test_the_committed_data_is_what_the_builder_makes_from_the_corpus(lang, tmp_path):
    assert build.examples(lang) == committed(lang)
    assert build.main(["--check"]) == 0
    assert build.main(["--out", str(tmp_path)]) == 0  # again, elsewhere: the same bytes
    name = f"megatrain_lastword_{lang}.jsonl"
    assert (tmp_path / name).read_bytes() == (TASK_DIR / name).read_bytes()
    assert len((tmp_path / name).read_bytes()) < 16_000  # a few KB


@pytest.mark.parametrize("lang", LANGUAGES)
def test_each_example_is_a_corpus_paragraph_cut_before_its_last_word(lang):
    with gzip.open(CORPUS / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = {d["id"]: d for d in map(json.loads, f)}
    examples = committed(lang)
    assert len(examples) == build.EXAMPLES
    assert len({e["id"] for e in examples}) == len(examples)  # one paragraph per document
    assert len({e["id"].split("/")[0] for e in examples}) >= 5  # spread over the books
    for e in examples:
        doc = docs[e["id"]]
        paragraph = doc["text"].split("\n\n")[e["paragraph"]]
        assert e["source"] == doc["source"] and e["id"].split("/")[1] == lang
        assert e["context"] + e["target"] + "." == paragraph
        word = e["target"][1:]
        assert e["target"] == " " + word and word.isalpha() and len(word) >= 4
        assert not e["context"].endswith(" ") and len(e["context"].split(" ")) >= 19
        assert word.lower() in e["context"].lower()
    the_first_20 = {e["id"].split("/")[0] for e in examples[:20]}
    assert len(the_first_20) >= 4  # --limit 20 takes a mix, not one book


def test_which_paragraphs_qualify():
    words = "Le paquet contient les fichiers du programme et la documentation du projet"
    good = f"{words}, que chaque utilisateur peut installer avec un seul paquet."
    assert build.split_last_word(good) == (good[: -len(" paquet.")], " paquet")
    assert build.split_last_word("- " + good) is None  # a list item
    assert build.split_last_word(good[:-1]) is None  # no full stop
    assert build.split_last_word(good.replace(" paquet.", " logiciel.")) is None  # word unseen
    assert build.split_last_word(good.replace(" paquet.", " apt-get.")) is None  # not a word
    assert build.split_last_word("Le paquet est un paquet.") is None  # too short
    assert build.split_last_word(" ".join([good] * 3)) is None  # too long
    assert build.split_last_word(good.replace(" que ", "\nque ")) is None  # two lines


def test_lm_eval_finds_the_tasks_and_their_data_from_any_directory(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    tasks = manager.load(["megatrain_lastword_fr", "megatrain_lastword_en"])["tasks"]
    for lang in LANGUAGES:
        task = tasks[f"megatrain_lastword_{lang}"]
        docs = list(task.test_docs())
        assert [dict(d) for d in docs] == committed(lang)
        assert task.doc_to_text(docs[0]) == docs[0]["context"]
        assert task.doc_to_target(docs[0]) == docs[0]["target"]
        assert task.OUTPUT_TYPE == "loglikelihood"
    assert set(manager.load(["megatrain_lastword"])["tasks"]) == set(tasks)  # the tag: both


def test_local_data_reads_jsonl_and_saved_datasets_beside_it_or_anywhere(tmp_path):
    import datasets

    local = script("local_data")
    rows = [{"text": "un"}, {"text": "deux"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert local.load(str(tmp_path / "t.jsonl"), version=1.0)["test"].to_list() == rows
    assert len(local.load("megatrain_lastword_en.jsonl")["test"]) == build.EXAMPLES
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert local.load_saved(str(tmp_path / "saved"))["test"].to_list() == rows
    with pytest.raises(FileNotFoundError, match="missing"):
        local.load("nothing.jsonl")
