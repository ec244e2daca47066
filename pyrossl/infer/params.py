"""Where the parameters of the zoo's Pyro models and guides live, without touching Pyro's global settings.

Every model and guide of the zoo is an ``nn.Module`` whose ``forward`` is the Pyro callable. Its
parameters are the module's own. Two ways of optimising them both work:

- the zoo's way (the trainer, the CLI, :class:`pyrossl.Run`): ``torch.optim`` on ``entry.parameters()``,
  run inside :func:`module_local`, where Pyro's ``module_local_params`` is on and the callables leave
  the global param store alone (two runs in one process share nothing);
- plain Pyro: ``pyro.infer.SVI(entry.model, entry.guide, pyro.optim.Adam(...), entry.elbo)`` with
  Pyro's defaults, where each callable registers its module with :func:`pyro.module` on every call
  (:func:`register`), as Pyro's own examples do, so that SVI's ``param`` capture finds and updates every
  parameter. As with any ``pyro.module``, the store keys each parameter by name (the module's class,
  then the parameter's path), so call ``pyro.clear_param_store()`` before training a second entry of
  the same class in one process.

Importing :mod:`pyrossl` changes no Pyro setting.
"""

from __future__ import annotations

import functools

import pyro
from torch import nn


def module_local():
    """A context in which Pyro keeps parameters in their modules (``module_local_params=True``),
    restoring the caller's setting on the way out."""
    return pyro.settings.context(module_local_params=True)


def in_module_local() -> bool:
    return bool(pyro.settings.get("module_local_params"))


def register(module: nn.Module, name: str | None = None) -> None:
    """``pyro.module(name, module)`` unless parameters are module-local (then nothing is needed).

    Called at the top of each model's and guide's ``forward``; ``name`` defaults to the module's class
    name, so a model and its guide never share a key.
    """
    if not in_module_local():
        pyro.module(name or type(module).__name__, module)


def with_module_local(function):
    """Decorate ``function`` to run inside :func:`module_local`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with module_local():
            return function(*args, **kwargs)

    return wrapper


__all__ = ["in_module_local", "module_local", "register", "with_module_local"]
