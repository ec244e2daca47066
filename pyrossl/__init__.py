"""pyrossl: a Pyro model zoo of deep generative classifiers.

Parameters live in modules: each zoo entry is a plain ``torch.nn.Module``, so checkpoints are
``state_dict`` s. Importing the package changes no Pyro setting: the zoo's own calls (the trainer,
the CLI, :class:`Run`) keep parameters module-local inside a scoped ``pyro.settings.context``, and
a user's plain ``pyro.infer.SVI`` on an entry's model and guide trains them through Pyro's param
store (:mod:`pyrossl.infer.params`).
"""

import os as _os

# In a source checkout, models/ and guides/ sit beside this package (an installed wheel has
# them inside it). Searching the parent folder too makes pyrossl.models and pyrossl.guides
# importable from a checkout without an install.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "models")):
    _root = _os.path.dirname(_here)
    if _os.path.isfile(_os.path.join(_root, "models", "__init__.py")):
        __path__.append(_root)  # noqa: F821 (the package's own __path__)

__version__ = "0.1.0"

from pyrossl.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    DataError,
    DatasetNotFound,
    PyrosslError,
    TrainingError,
)


def __getattr__(name):
    # Run and load_run come from the run-folder layer, loaded on first use: importing a model module
    # (pyrossl.models.m2) loads the model, its guides and the layers below, nothing of runs or training
    if name in ("Run", "load_run"):
        from pyrossl import run

        return getattr(run, name)
    raise AttributeError(f"module 'pyrossl' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), "Run", "load_run"})


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DatasetNotFound",
    "PyrosslError",
    "Run",
    "TrainingError",
    "__version__",
    "load_run",
]
