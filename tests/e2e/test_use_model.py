"""The trained model out of megatrain and back in, with the real `transformers` (CPU, fp32):
export after ZeRO-2, ZeRO-3 and tensor-parallel runs, generation, import of an HF Llama,
continued pretraining, and the errors a user can run into."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from megatrain.checkpoint import CheckpointError
from megatrain.errors import MegatrainError
from megatrain.export import export
from megatrain.generate import Sampling, generate, load_model, top_p_filter
from megatrain.hf import ConversionError, from_hf, read_hf_tensors, to_hf
from tests.distributed.test_trainer import base
from tests.helpers import REPO, read_jsonl, run_train

TINY = REPO / "configs" / "tiny.yaml"
transformers = pytest.importorskip("transformers")


def hf_logits(directory, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    """Short 2-process runs under ZeRO-2, ZeRO-3 and tensor parallelism 2, and a GPT-2-style
    one, each validated at its end."""
    root = tmp_path_factory.mktemp("use_model")
    layouts = {
        "zero2": {"parallel.zero_stage": 2},
        "zero3": {"parallel.zero_stage": 3},
        "tp2": {"parallel.zero_stage": 1, "parallel.tensor": 2},
        "gpt2": {
            "parallel.zero_stage": 2,
            "model.mlp": "gelu",
            "model.norm": "layernorm",
            "model.position": "learned",
            "model.bias": "true",
            "model.tie_embeddings": "true",
        },
    }
    for name, extra in layouts.items():
        run_train(TINY, base(tiny_dataset, root / name, **{"run.max_steps": 6, **extra}))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zero2", "zero3", "tp2", "gpt2"])
def test_export_gives_transformers_the_trained_model(runs, tmp_path, layout):
    run_dir = runs / layout
    out = export(run_dir, tmp_path / "hf")
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    model, _, _ = load_model(run_dir)
    with torch.no_grad():
        ours = model(ids)
    assert (hf_logits(out, ids) - ours).abs().max() < 1e-4
    # what was consolidated from the shards is what trained: the validation loss the trainer
    # logged at its last step, computed again from the checkpoint
    cli = [sys.executable, "-m", "megatrain.cli", "eval", str(run_dir), "--device", "cpu"]
    subprocess.run(cli, check=True, capture_output=True, cwd=REPO)
    logged = [r["val_loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r]
    again = json.loads((run_dir / "eval" / "perplexity-validation.json").read_text())["loss"]
    assert again == pytest.approx(logged[-1], rel=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [
        "GPT2LMHeadModel" if layout == "gpt2" else "LlamaForCausalLM"
    ]
    assert config["megatrain"]["step"] == 6 and config["megatrain"]["tokens"] == 6 * 16 * 64
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == tokenizer.eos_token
    assert "step 6" in (out / "README.md").read_text()


@pytest.mark.slow
def test_greedy_generation_matches_transformers_token_for_token(runs, tmp_path):
    out = export(runs / "zero2", tmp_path / "hf")
    model, tokenizer, eos = load_model(out)
    prompt = tokenizer.encode("La rivière qui traverse la ville").ids
    ours = list(generate(model, prompt, 20, Sampling(), eos_id=None))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=eos,
    )[0, len(prompt) :].tolist()
    assert ours == theirs
    top1 = list(generate(model, prompt, 20, Sampling(temperature=1.0, top_k=1, seed=5)))
    assert top1 == ours
    sampled = [
        list(generate(model, prompt, 20, Sampling(temperature=1.0, seed=s))) for s in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    assert torch.equal(
        top_p_filter(probs, 0.7) > 0, torch.tensor([[False, True, False, True, False]])
    )
    assert torch.equal(
        top_p_filter(probs, 0.71) > 0, torch.tensor([[False, True, False, True, True]])
    )
    assert torch.equal(
        top_p_filter(probs, 0.3) > 0, torch.tensor([[False, True, False, False, False]])
    )


@pytest.fixture(scope="module")
def hf_llama(tiny_dataset, tmp_path_factory):
    """A small random LlamaForCausalLM made by transformers: grouped-query attention, untied
    embeddings, rope theta 50000, with the tiny dataset's tokenizer."""
    directory = tmp_path_factory.mktemp("hf_llama") / "llama"
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    shutil.copy(tiny_dataset / "tokenizer.json", directory / "tokenizer.json")
    return directory


def test_an_hf_llama_imports_with_its_logits_and_exports_back_the_same(hf_llama):
    model, _, _ = load_model(hf_llama)
    assert (model.cfg.n_kv_head, model.cfg.rope_theta, model.cfg.tie_embeddings) == (2, 5e4, False)
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - hf_logits(hf_llama, ids)).abs().max() < 1e-4
    original = dict(read_hf_tensors(hf_llama))
    back = dict(to_hf(model.cfg, from_hf(model.cfg, read_hf_tensors(hf_llama))))
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.slow
def test_continued_pretraining_from_an_hf_model(hf_llama, tiny_dataset, tmp_path):
    run_dir = tmp_path / "continued"
    args = base(tiny_dataset, run_dir, **{"run.max_steps": 3, "parallel.zero_stage": 1})
    run_train(TINY, args + [f"model.init_from={hf_llama}", "model.preset=null"], nproc=1)
    events = [e["event"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert "initialized_from" in events
    first = read_jsonl(run_dir / "metrics.jsonl")[0]["loss"]
    out = export(run_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    # it started from the model's weights, not from a fresh init: its first loss is the model's
    ids = torch.randint(0, 512, (1, 8))
    assert first < 7.0 and hf_logits(out, ids).shape == (1, 8, 512)


@pytest.mark.slow
def test_export_and_import_refuse_by_name(runs, tiny_dataset, tmp_path, hf_llama):
    with pytest.raises(CheckpointError, match="has no complete checkpoint"):
        export(tmp_path / "nothing", tmp_path / "out")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs / "zero2", corrupt)
    shard = next((corrupt / "checkpoints" / "step00000006").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="does not verify.*optim_states.pt has"):
        export(corrupt, tmp_path / "out")
    odd = tmp_path / "odd"
    args = base(tiny_dataset, odd, **{"run.max_steps": 1, "model.position": "learned"})
    run_train(TINY, args, nproc=1)
    with pytest.raises(ConversionError, match=r"closest is llama, but model.position=learned"):
        export(odd, tmp_path / "out")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match="model_type 'bert'"):
        load_model(bert)
    foreign = tmp_path / "foreign"
    shutil.copytree(hf_llama, foreign)
    vocab = json.loads((foreign / "tokenizer.json").read_text())
    ids = vocab["model"]["vocab"]  # the same tokens, two of them under each other's id
    a, b = list(ids)[300], list(ids)[301]
    ids[a], ids[b] = ids[b], ids[a]
    (foreign / "tokenizer.json").write_text(json.dumps(vocab))
    cli = [
        sys.executable,
        "-m",
        "megatrain.cli",
        "train",
        str(TINY),
        *base(tiny_dataset, tmp_path / "r"),
        f"model.init_from={foreign}",
        "model.preset=null",
    ]
    out = subprocess.run(cli, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "--tokenizer" in out.stderr and "Traceback" not in out.stderr
    assert isinstance(ConversionError("x"), MegatrainError)
