# Two commands for a new user: `make demo` and `make test`.
# Both create .venv in the repo root and install marlkd with every extra.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where this machine keeps the CPU build of PyTorch pinned in constraints.txt.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(FIND_LINKS) -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/marlkd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# Environment overhead against sumo-rl (bench/env_overhead.py, docs/benchmarks.md).
# sumo-rl 1.4.5 needs PettingZoo < 1.25, so it gets a venv of its own.
SUMO_RL_VENV := bench/.venv-sumo-rl

$(SUMO_RL_VENV)/.installed: bench/requirements-sumo-rl.txt
	$(PYTHON) -m venv $(SUMO_RL_VENV)
	$(SUMO_RL_VENV)/bin/python -m pip install --quiet -r bench/requirements-sumo-rl.txt
	touch $@

.PHONY: bench-env
bench-env: $(STAMP) $(SUMO_RL_VENV)/.installed
	$(BIN)/python bench/env_overhead.py
