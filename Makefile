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

# The install step also installs the integrations' frameworks, which the tests run, without their
# heavy extras (datasets, tensorboard, wandb): their checkpointing and torchtitan's llama3 model
# need only these beside torch and numpy. torchtitan needs Python 3.11; on 3.10 its tests skip.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test]"
	$(PY) -m pip install --no-deps --no-warn-conflicts "torch_checkpointing==0.1.1"
	if $(PY) -c "import sys; sys.exit(sys.version_info < (3, 11))"; then \
	  $(PY) -m pip install "tyro==1.0.17" && \
	  $(PY) -m pip install --no-deps --no-warn-conflicts "torchtitan==0.3.0" "spmd_types==0.2.3"; \
	else echo "Python < 3.11: torchtitan is not installed, its integration tests will skip"; fi
	touch $(STAMP)

# ruff first (pyflakes, import order, line length: configured in pyproject.toml), then the tests.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m stager demo

bench: $(STAMP)
	$(PY) -m stager bench

doctor: $(STAMP)
	$(PY) -m stager doctor

clean:
	rm -rf $(VENV) build *.egg-info
