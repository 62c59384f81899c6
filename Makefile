# The two commands a newcomer needs (each installs everything first, into .venv):
#   make demo   -- synthetic CT data, a short training, inference, scores and a picture
#   make test   -- the whole test suite
VENV ?= .venv

.PHONY: setup demo test lint typecheck docs

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/medunet demo --out medunet-demo --overwrite

# One test process per CPU core (pytest-xdist), a whole module per process: the shared trained models
# (tests/conftest.py) are built once for all of them. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= auto
test: setup
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(VENV)/bin/ruff check medunet tests scripts

typecheck: setup
	$(VENV)/bin/mypy medunet

docs: setup
	$(VENV)/bin/python scripts/gen_config_reference.py
