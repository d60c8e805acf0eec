# Two commands do everything on a fresh machine (README): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# A demo ablation on the bundled Wikipedia slice (AR vs. AR + token masking vs. masked diffusion), then its report.
demo: setup
	$(VENV)/bin/workbench ablate ablations/demo.yaml
	$(VENV)/bin/workbench report results/demo

test: setup
	$(PY) -c "from streaming.base.util import clean_stale_shared_memory as c; c()"
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
