# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch unless an NVIDIA GPU is visible; override with TORCH_SPEC / TORCH_INDEX.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= torch==2.13.0
ifeq ($(HAS_GPU),1)
TORCH_INDEX ?=
else
TORCH_INDEX ?= --index-url https://download.pytorch.org/whl/cpu
endif
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: install test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	# 1) torch already there: keep it. 2) a local wheel (pip find-links), taken without any index;
	# its own dependencies come with the project below. 3) otherwise the CPU index on machines
	# without an NVIDIA GPU, the default index with one.
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install -q --no-index --no-deps "$(TORCH_SPEC)" 2>/dev/null || \
	  $(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(BIN)/3cad demo $(DEMO_DIR) --overwrite

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/preprocess.py
	$(BIN)/python benchmarks/inference.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
