# Two set-up commands (README): `make demo` runs the demo training run, `make test` runs all tests.
# Both create or reuse .venv and install the project with torch pinned to the CPU build on disk.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PINS := torch==2.13.0 lightning==2.6.6 accelerate==1.15.0

# Fashion-MNIST (the benchmark smoke tests train on it): Debian's dataset-fashion-mnist.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
FASHION_MNIST_FILES := $(addprefix $(FASHION_MNIST)/,train-images-idx3-ubyte.gz \
	train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -y -qq

.PHONY: venv data demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PINS) -e '.[dev,deepspeed]'
	touch $@

venv: $(VENV)/.installed

# Installs the dataset when it is missing and we are root (CI: a clean Debian machine);
# silent when it is there. The package lists are refreshed only if the first try fails.
data:
	@missing=; for f in $(FASHION_MNIST_FILES); do [ -f "$$f" ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "make data: installing dataset-fashion-mnist"; \
	    $(APT_GET) install dataset-fashion-mnist >/dev/null 2>&1 || \
	      { $(APT_GET) update >/dev/null && $(APT_GET) install dataset-fashion-mnist >/dev/null; }; \
	  else \
	    echo "make data: Fashion-MNIST is missing from $(FASHION_MNIST); as root run:" \
	      "apt-get update && apt-get install -y dataset-fashion-mnist" >&2; \
	  fi; \
	fi

demo: venv
	$(PY) examples/demo.py

test: venv data
	$(PY) -m pytest -q tests integration_tests

clean:
	rm -rf $(VENV) lightning_logs runs
