# Two entry points for a fresh clone: `make test` and `make demo`.
# Both create .venv when missing, install torch==2.13.0 when torch is absent
# (a local CPU build on CPU machines), install this project editable, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stager-installed

.PHONY: test demo bench doctor install clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m stager demo

bench: $(STAMP)
	$(PY) -m stager bench

doctor: $(STAMP)
	$(PY) -m stager doctor

clean:
	rm -rf $(VENV) build *.egg-info
