import os

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _validation_and_threads():
    pyro.enable_validation(True)
    pyro.clear_param_store()
    yield
    pyro.enable_validation(False)


torch.set_num_threads(1)
# one thread in each process the tests start too (CLI runs, notebook kernels): the suite's workers (pytest-xdist)
# share the cores between them, and two-thread children on a busy core only wait on each other
os.environ.setdefault("OMP_NUM_THREADS", "1")


#: the modules that take longest, longest first (measured: `pytest --durations=0`); the rest follow in
#: their own order. With `make test`'s `--dist loadfile` each module goes whole to the next free worker,
#: so starting with the long ones lets the workers end together
LONGEST_FIRST = [
    "test_notebooks.py",
    "test_train.py",
    "test_distributed.py",
    "test_benchmarks.py",
    "test_plugins.py",
    "test_fuzz.py",
    "test_ablate.py",
    "test_m2.py",
    "test_zoo.py",
    "test_docs.py",
    "test_cli.py",
    "test_zguide.py",
]


@pytest.hookimpl(trylast=True)  # after pytest's own grouping by fixture: the order within a module stays
def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
