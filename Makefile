# The README's two commands are `make run` and `make test`; each installs everything first.
PYTHON ?= python
PIP_INSTALL = DS_BUILD_OPS=0 $(PYTHON) -m pip install -q torch==2.13.0 -e '.[test]'

.PHONY: install run test test-slow lint bench-layer

install:
	$(PIP_INSTALL)

# The main job: the OpenAI-compatible server on the embedded default model (127.0.0.1:8000; Ctrl-C drains).
run: install
	moe-serve

bench-layer:
	$(PYTHON) -m benchmarks.layer

# pytest deselects the `slow` cases by default (pyproject.toml)
test: install
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow

# the layer order (import-linter contracts in pyproject.toml), style, types; also in .ci/run and pre-commit
lint:
	lint-imports --no-cache
	ruff check .
	mypy
