# `make demo` and `make test` create .venv when it is missing and install the pinned versions of
# constraints.txt (torch==2.13.0, the CPU wheel: never an unpinned torch, which pulls CUDA packages).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pyrossl-installed
# the torch CPU wheel: from a local wheel folder where the machine has one, else PyTorch's CPU index
# (PyPI's torch wheel for Linux depends on several GB of CUDA packages)
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
TORCH_SOURCE := $(if $(wildcard /opt/wheels),$(FIND_LINKS),--index-url https://download.pytorch.org/whl/cpu)

.PHONY: install demo test lint docs clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SOURCE) "torch==2.13.0"
	$(BIN)/python -m pip install -q $(FIND_LINKS) -c constraints.txt -e ".[test,docs,lint]"
	touch $(STAMP)

# a fresh run folder each time (outputs/demo-<date>-<time>): the demo runs again and again, always ending with its table
demo: $(STAMP)
	$(BIN)/pyrossl train runs/demo.toml --out outputs/demo-$$(date +%Y%m%d-%H%M%S) --threads 2

# the suite in one pytest-xdist worker per core (at most 4: each holds torch and the data it loads), each
# module whole to the next free worker, the longest modules first (tests/conftest.py); every process a test
# starts runs one thread (tests/conftest.py too), so the workers share the cores without waiting on each other
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests

# ruff's lint rules of pyproject.toml ([tool.ruff]) over the code, tests, benchmarks and tutorial sources
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the site: Sphinx + myst-nb (tutorials executed in their quick mode), warnings are errors
docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf outputs build *.egg-info docs/_build docs/jupyter_execute
