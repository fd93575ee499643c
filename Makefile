# mmcbn: `make demo` runs the main job end to end, `make test` the tests.
# Both install what they need into .venv first (idempotent, seconds when done).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo clean

install:
	VENV=$(VENV) bash tools/install.sh

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: install
	$(PY) tools/demo.py

clean:
	rm -rf work_dirs data/demo .pytest_cache
