# The README's two commands are `make run` and `make test`; each installs everything first.
PYTHON ?= python
PIP_INSTALL = DS_BUILD_OPS=0 $(PYTHON) -m pip install -q torch==2.13.0 -e '.[test]'

.PHONY: install run test test-slow bench-layer

install:
	$(PIP_INSTALL)

# The main job: the OpenAI-compatible server on the embedded default model (127.0.0.1:8000; Ctrl-C drains).
run: install
	moe-serve

bench-layer:
	$(PYTHON) -m benchmarks.layer

test: install
	$(PYTHON) -m pytest -q -m "not slow"

test-slow: install
	$(PYTHON) -m pytest -q -m slow
