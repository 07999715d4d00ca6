# Two entry points: `make demo` (compress a shipped teacher) and `make test` (the test suite).
# Both create .venv, install the package with its data on first use, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint setup data clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch (pip takes it from the local wheel cache where one exists)
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.2"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# Fashion-MNIST from Debian's package; without root or apt the loader downloads and checks the files instead.
data:
	@test -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz || \
	  ( (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
	    echo "note: could not install dataset-fashion-mnist; files will be downloaded on first use" )

demo: setup data
	$(BIN)/crossdistill demo --overwrite

test: setup data
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check crossdistill tests benchmarks scripts
	$(BIN)/ruff format --check crossdistill tests benchmarks scripts

clean:
	rm -rf $(VENV) runs/demo
