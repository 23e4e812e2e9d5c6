# Two set-up commands (README): `make demo` runs the demo training run, `make test` runs all tests.
# Both create or reuse .venv and install the project with torch pinned to the CPU build on disk.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PINS := torch==2.13.0 lightning==2.6.6 accelerate==1.15.0

.PHONY: venv demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PINS) -e '.[dev,deepspeed]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/demo.py

test: venv
	$(PY) -m pytest -q tests integration_tests

clean:
	rm -rf $(VENV) lightning_logs runs
