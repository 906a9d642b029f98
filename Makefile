# The two quick-start commands of the README. Each creates .venv and builds the extension when
# missing, and reuses them when present.
#   make demo   runs `otherview exec specs/plantain.toml` on the built-in tiny random model
#   make test   runs the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.otherview-installed
TORCH_VERSION ?= 2.13.0

.PHONY: demo test env

env: $(STAMP)

$(STAMP): setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q ninja pybind11
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/otherview exec specs/plantain.toml --model builtin:tiny

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
