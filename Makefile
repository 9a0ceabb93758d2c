# megatrain: `make demo` and `make test` are all a fresh clone needs (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, pinned to the CPU wheel that lies on disk on our dev/CI machines; on a
# GPU machine pass e.g. TORCH_SPEC='torch' to take your cluster's CUDA build.
TORCH_SPEC ?= torch==2.13.0
# DeepSpeed JIT-compiles a small op at its first init: keep it across runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

DEMO_DATA ?= data/demo
DEMO_RUN  ?= runs/tiny-demo
demo: install
	$(BIN)/megatrain prep corpus/ --out $(DEMO_DATA) --vocab-size 4096
	$(BIN)/megatrain train configs/tiny.yaml --nproc 2 data.sources.0.path=$(DEMO_DATA) run.dir=$(DEMO_RUN)
	$(BIN)/megatrain report $(DEMO_RUN)
	$(BIN)/megatrain generate $(DEMO_RUN) --prompts configs/demo-prompts.txt --max-new-tokens 40 \
		--temperature 0.7 --top-p 0.9 --seed 1

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not slurm"

LINTED := megatrain data_prep tests bench corpus configs
lint: install
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/ruff check $(LINTED)

format: install
	$(BIN)/ruff format $(LINTED)
	$(BIN)/ruff check --fix $(LINTED)

clean:
	rm -rf $(VENV) .cache data/demo runs/tiny-demo
