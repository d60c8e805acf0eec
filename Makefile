# Two commands do everything on a fresh machine (README): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,trackers,harness,dashboard]'
	touch $@

setup: $(VENV)/.installed

# A demo ablation on the bundled Wikipedia slice (AR vs. AR + token masking / MLP dropout vs. masked diffusion),
# then its report. Writes runs/demo/ (git-ignored); results/demo/ holds the committed run of the same file.
DEMO_OUT ?= runs
demo: setup
	$(VENV)/bin/workbench ablate ablations/demo.yaml --results $(DEMO_OUT)
	$(VENV)/bin/workbench report $(DEMO_OUT)/demo

# Two pytest-xdist workers, a test file each at a time (module fixtures train once): ~14 min instead of ~19 on the
# 2-core CPU, where many tests wait on subprocesses. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -c "from streaming.base.util import clean_stale_shared_memory as c; c()"
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: setup
	$(VENV)/bin/ruff check .
