# Two commands do all set-up: `make demo` and `make test`.
# Each creates .venv when missing, installs torch==2.13.0 first unless a torch is
# already importable there (an unpinned torch would pull a multi-GB CUDA build),
# then the package with the extras it needs.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip install --disable-pip-version-check
TORCH_VERSION ?= 2.13.0

.PHONY: demo test test-fast docs lint bench reproduce clean

$(PYTHON):
	python3 -m venv $(VENV)

$(VENV)/.torch: | $(PYTHON)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) "torch==$(TORCH_VERSION)"
	touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(PIP) -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-cli
	$(PYTHON) examples/demo.py

test: $(VENV)/.installed-test
	$(PYTHON) -m pytest -q

# The loop while you edit: everything but the tests marked slow (servers, W&B runs, benchmark and
# experiment runs, DDP, the budget run); `make test` and .ci/run still run them all.
test-fast: $(VENV)/.installed-test
	$(PYTHON) -m pytest -q -m "not slow"

# The manual and the API reference (from the docstrings), built offline into build/docs; any warning fails.
docs: $(VENV)/.installed-docs
	$(VENV)/bin/mkdocs build --strict

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check lightning_hessian tests benchmarks examples

bench: $(VENV)/.installed-test
	PYTHON=$(PYTHON) bash benchmarks/install_peers.sh
	$(PYTHON) -m benchmarks.run

reproduce: $(VENV)/.installed-cli
	$(VENV)/bin/lightning-hessian reproduce

clean:
	rm -rf $(VENV) lightning_logs runs
