# All set-up happens here: every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt "torch==2.13.0"
	$(PIP) install --quiet -c constraints.txt -e ".[test,flower,tensorboard,privacy,quantization]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/raflora compare configs/quickstart.yaml --out runs/quickstart --overwrite

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/aggregation.py
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/partition.py
	$(PY) benchmarks/quantization.py
	$(PY) benchmarks/concurrent_clients.py
	$(PY) benchmarks/flora_export.py
	$(PY) benchmarks/privacy_audit.py

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
