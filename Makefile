# Quick start: `make test` (install + tests) and `make train` (install + the main job).
# Both install into .venv first and are safe to re-run: the install step is skipped
# while .venv/.installed is newer than setup.cfg.
PYTHON ?= python3.11
VENV   ?= .venv
# CPU machines: the pinned CPU wheel. On a GPU workstation pass another spec, e.g.
#   make install TORCH_SPEC="torch==2.5.1" TORCH_PIP_ARGS="--index-url <your CUDA wheel index>"
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= dev,hf,megatron,triton
PYTEST_ARGS ?=
# Where `make train` writes its run (run.output_dir).
RUNS ?= runs

# The NeMo-Aligner tier: NeMo 2.1.0 + NeMo-Aligner 0.7.0 + megatron-core 0.10.0 in their own venv,
# every version pinned by constraints/aligner-cpu.txt (CPU; recipe in docs of ../shared/notes/cpu-stack.md).
ALIGNER_VENV ?= .venv-aligner
ALIGNER_PINS ?= constraints/aligner-cpu.txt

.PHONY: install lint test train clean install-aligner test-aligner

$(VENV)/.installed: setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# mamba-ssm (a NeMo dependency) is built from source without its CUDA kernels, before NeMo.
$(ALIGNER_VENV)/.installed: $(ALIGNER_PINS) setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'" >&2; exit 1; }
	test -x $(ALIGNER_VENV)/bin/python || $(PYTHON) -m venv $(ALIGNER_VENV)
	$(ALIGNER_VENV)/bin/python -m pip install --quiet -c $(ALIGNER_PINS) pip setuptools wheel
	$(ALIGNER_VENV)/bin/python -m pip install --quiet -c $(ALIGNER_PINS) $(TORCH_PIP_ARGS) torch
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $(ALIGNER_VENV)/bin/python -m pip install --quiet -c $(ALIGNER_PINS) --no-build-isolation mamba-ssm
	$(ALIGNER_VENV)/bin/python -m pip install --quiet -c $(ALIGNER_PINS) "nemo_toolkit[nlp]" megatron-core nemo-aligner \
		transformers sentence-transformers datasets pangu zarr pyarrow
	$(ALIGNER_VENV)/bin/python -m pip install --quiet -c $(ALIGNER_PINS) -e ".[dev]"
	touch $@

install-aligner: $(ALIGNER_VENV)/.installed

# The NeMo-Aligner tier's tests (tests_aligner/), after the default suite in .ci/run.
test-aligner: install-aligner
	$(ALIGNER_VENV)/bin/python -m pytest tests_aligner $(PYTEST_ARGS)

# Lint: the rules of pyproject.toml's [tool.ruff] (bugs, not style), with the ruff of the [dev] extra.
lint: install
	$(VENV)/bin/python -m ruff check .

# The default suite (what .ci/run runs): lint first, then everything but GPU tests, which skip themselves.
test: lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The main job, re-runnable: the previous demo run (with any evaluation saved under its
# checkpoints) is moved aside to $(RUNS)/tiny_cpu.prev-<timestamp>, never deleted, and not
# while a run is using it; `nemo-guide train` itself never overwrites a run directory.
train: install
	$(VENV)/bin/python -m nemo_guide.rundir set-aside $(RUNS)/tiny_cpu
	$(VENV)/bin/nemo-guide train conf/tiny_cpu.yaml run.output_dir=$(RUNS)

clean:
	rm -rf $(VENV) $(ALIGNER_VENV) build *.egg-info .pytest_cache
