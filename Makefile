# The two commands a newcomer needs: `make run` and `make test`. Both bootstrap .venv on a fresh
# machine that has only Python 3.11+ and make.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PACKAGE_DIRS := server protocol crypto clients
MYPY_PACKAGES := -p medrelay.server -p medrelay.protocol -p medrelay.crypto -p medrelay.clients

.PHONY: test run lint typecheck unit install clean

test: install lint typecheck unit

# The relay on its embedded defaults: SQLite and the clinic keys under ./var/ (created on the
# first start), clients on 127.0.0.1:8448, metrics on 127.0.0.1:9464. Ctrl-C stops it in order.
# Then: .venv/bin/medrelay-server admin add-user ... (docs/operations.md).
run: install
	$(BIN)/medrelay-server serve $(RUN_ARGS)

# Strict editable mode links each source file into build/, which is what lets mypy see the
# package-dir mapping. A *new* module needs a re-install, so the stamp hashes the file list and
# pyproject.toml (not file contents: edits to existing files are seen through the links).
install: $(BIN)/python
	@stamp="$$( { find $(PACKAGE_DIRS) \( -name '*.py' -o -name 'py.typed' \) | LC_ALL=C sort; cat pyproject.toml; } | sha256sum | cut -d' ' -f1)"; \
	if [ "$$(cat $(VENV)/.installed 2>/dev/null)" != "$$stamp" ]; then \
		echo "installing medrelay into $(VENV) (strict editable mode)"; \
		if $(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=strict \
				> $(VENV)/install.log 2>&1; then \
			echo "$$stamp" > $(VENV)/.installed; \
		else \
			cat $(VENV)/install.log; echo "pip install failed (log: $(VENV)/install.log)"; exit 1; \
		fi; \
	fi

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "medrelay needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy $(MYPY_PACKAGES)
	$(BIN)/mypy tests $(wildcard bench/*.py)

# Call the pytest entry point, never `python -m pytest`: the latter puts the repo root on sys.path
# and makes the bare folder names importable (tests/test_packaging.py guards against it).
# One pytest worker per core (pytest-xdist); PYTEST_WORKERS=0 runs in this process, e.g. to debug.
PYTEST_WORKERS ?= auto
unit: install
	$(BIN)/pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache .hypothesis
