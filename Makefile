# One entry point for people and CI. `make test` and `make serve` work on a fresh machine:
# they create .venv, install torch first (so pip never pulls a CUDA build by accident on CPU
# hosts), then the package with its extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on the dev machines; on a GPU node `make TORCH_SPEC=torch==2.13.0 ...` from the
# CUDA index (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test serve world clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	bash scripts/install_system_deps.sh
	touch $@

test: setup
	$(BIN)/python -m pytest -q -ra

serve: setup
	$(BIN)/cdlm serve

# Regenerate the small world end to end (data, teacher, trajectories, student, table);
# every stage resumes when rerun. About 35 minutes on 2 CPU cores (docs/training.md).
world: setup
	$(BIN)/python -m cdlm.training world --out runs/world

clean:
	rm -rf $(VENV) .pytest_cache
