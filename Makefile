# Set-up and checks.  `make run` installs and runs the main job with the shipped
# defaults; `make test` installs what the tests need and runs them (CI calls it).
#
# TORCH picks the torch build.  The default is the CPU wheel (quick to install,
# and on our machines it is a local file).  On a GPU machine install your CUDA
# torch into the venv first, or run `make install TORCH=torch`.

PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DATA ?= ../shared/data
BIN := $(VENV)/bin

.PHONY: install run test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

run: install
	$(BIN)/nuclick-bridge evaluate --images $(DATA)/monuseg/images --labels $(DATA)/monuseg/labels \
	    --split val --jitter 5 --seed 0

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/nuclei_per_second.py --data $(DATA)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
