PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# the servers and tools the tests start (PostgreSQL, MariaDB, OpenSSH, Azurite, QEMU and a kernel
# for the LVM tests' VM): installed by the idempotent scripts of .ci/install.d, as root (through
# sudo when run by another user)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test servers lint typecheck unit fault clean

# the archive_command shell script is copied into the venv at install: a change needs a reinstall
# pyfuse3 (the mount extra, in dev) is built against libfuse 3: its headers come first
$(STAMP): pyproject.toml src/keepwell/sources/postgres/keepwell-wal-push
	$(SUDO) bash .ci/install.d/fuse.sh
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(VENV)/bin/python -m compileall -q src >/dev/null
	touch $(STAMP)

run: $(STAMP)
	bash examples/demo.sh

servers: $(STAMP)
	@for script in .ci/install.d/*.sh; do \
		echo "== $$script"; $(SUDO) bash "$$script" || exit 1; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

# the whole package, and the engine's storage layers (repository, backends) strictly
typecheck: $(STAMP)
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict src/keepwell/repository src/keepwell/backends

unit: $(STAMP)
	KEEPWELL_TESTONLY_WEAK_KDF=1 $(VENV)/bin/pytest -q tests/unit

# the fault suite (crashes, full disks, failed writes, damage, network faults); for the long
# randomised crash run: KEEPWELL_FAULT_TRIALS=200 make fault
fault: $(STAMP) servers
	KEEPWELL_TESTONLY_WEAK_KDF=1 $(VENV)/bin/pytest -q -p no:cacheprovider -rP tests/fault

# every test, with the servers installed first; a skipped test fails the run (tests/conftest.py).
# TEST_JOBS processes share the files of tests (the tests of one file run in one process, beside
# its fixtures); each starts its own servers on free ports and temporary directories
TEST_JOBS ?= 2
test: $(STAMP) servers lint typecheck
	KEEPWELL_TESTONLY_WEAK_KDF=1 $(VENV)/bin/pytest -q -p no:cacheprovider -n $(TEST_JOBS) \
		--dist loadfile --durations=25 tests

clean:
	rm -rf demo bench/work
