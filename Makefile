PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit fault clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	bash examples/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	KEEPWELL_TESTONLY_WEAK_KDF=1 $(VENV)/bin/pytest -q tests/unit

# the fault suite (crashes, full disks, failed writes, damage, network faults); for the long
# randomised crash run: KEEPWELL_FAULT_TRIALS=200 make fault
fault: $(STAMP)
	KEEPWELL_TESTONLY_WEAK_KDF=1 $(VENV)/bin/pytest -q -p no:cacheprovider -rP tests/fault

test: $(STAMP) lint typecheck
	KEEPWELL_TESTONLY_WEAK_KDF=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests

clean:
	rm -rf demo bench/work
