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
ALIGNER_PYTEST_ARGS ?=
# Where `make train` writes its run (run.output_dir).
RUNS ?= runs

# The NeMo-Aligner tier: NeMo 2.1.0 + NeMo-Aligner 0.7.0 + megatron-core 0.10.0 in their own venv,
# every version pinned by constraints/aligner-cpu.txt (CPU; recipe in docs of ../shared/notes/cpu-stack.md).
ALIGNER_VENV ?= .venv-aligner
ALIGNER_PINS ?= constraints/aligner-cpu.txt

.PHONY: install lint test test-default train clean install-aligner test-aligner aligner-demo

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

# The NeMo-Aligner tier's tests (tests_aligner/); `make test` runs it after the default suite.
test-aligner: install-aligner
	$(ALIGNER_VENV)/bin/python -m pytest tests_aligner $(ALIGNER_PYTEST_ARGS)

# The plugin's CPU main job: builtin:tiny-llama -> .nemo, then Guide-GRPO through NeMo-Aligner
# (conf/aligner/tiny_cpu.yaml; resumes from runs/aligner/tiny_cpu when it has checkpoints).
# Re-running continues the run from its newest checkpoint; ALIGNER_ARGS adds Hydra overrides
# (e.g. ALIGNER_ARGS="trainer.guide.run.seed=1 exp_manager.explicit_log_dir=runs/aligner/seed1").
ALIGNER_RUNS ?= runs/aligner
ALIGNER_ARGS ?=
aligner-demo: install-aligner
	test -f $(ALIGNER_RUNS)/tiny_llama.nemo || $(ALIGNER_VENV)/bin/nemo-guide convert hf-to-nemo \
		"$$($(ALIGNER_VENV)/bin/python -c 'from nemo_guide.backends.torch.models import builtin_path; print(builtin_path("builtin:tiny-llama"))')" \
		$(ALIGNER_RUNS)/tiny_llama.nemo --dtype float32
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(ALIGNER_VENV)/bin/python tests_aligner/run_cpu.py --config-path $(CURDIR)/conf/aligner --config-name tiny_cpu \
		pretrained_checkpoint.restore_from_path=$(ALIGNER_RUNS)/tiny_llama.nemo exp_manager.explicit_log_dir=$(ALIGNER_RUNS)/tiny_cpu $(ALIGNER_ARGS)

# Lint: the rules of pyproject.toml's [tool.ruff] (bugs, not style), with the ruff of the [dev] extra.
lint: install
	$(VENV)/bin/python -m ruff check .

# The README's test command (what .ci/run runs): the default suite, then the NeMo-Aligner tier.
test: test-default test-aligner

# The default suite: lint first, then everything but GPU tests, which skip themselves.
test-default: lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The main job, re-runnable: the previous demo run (with any evaluation saved under its
# checkpoints) is moved aside to $(RUNS)/tiny_cpu.prev-<timestamp>, never deleted, and not
# while a run is using it; `nemo-guide train` itself never overwrites a run directory.
train: install
	$(VENV)/bin/python -m nemo_guide.rundir set-aside $(RUNS)/tiny_cpu
	$(VENV)/bin/nemo-guide train conf/tiny_cpu.yaml run.output_dir=$(RUNS)

clean:
	rm -rf $(VENV) $(ALIGNER_VENV) build *.egg-info .pytest_cache
