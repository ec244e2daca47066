import pyro
import pytest


@pytest.fixture(autouse=True)
def _validation_and_threads():
    pyro.enable_validation(True)
    pyro.clear_param_store()
    yield
    pyro.enable_validation(False)
