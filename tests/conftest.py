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
