"""The posterior predictive of a model and guide: data drawn from the model at the guide's latents.

For observed data x (and labels y where given), one draw is

    z ~ q(z | x, y),   x' ~ p(x | z, y),

the model replayed on the guide's latents with the observed sites named in ``resample`` drawn afresh
instead of scored. ``pyro.infer.Predictive`` over :func:`guided_predictive_model` repeats it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pyro import poutine
from pyro.poutine.messenger import Messenger

from pyrossl.infer.params import module_local


class ResampleObserved(Messenger):
    """Turn the observed sample sites ``names`` into sampled ones (``poutine.uncondition`` for some sites only)."""

    def __init__(self, names: Iterable[str]):
        super().__init__()
        self.names = frozenset(names)

    def _pyro_sample(self, msg):
        if msg["is_observed"] and msg["name"] in self.names:
            msg["is_observed"] = False
            msg["infer"]["was_observed"] = True
            msg["infer"]["obs"] = msg["value"]
            msg["value"] = None
            msg["done"] = False


def guided_predictive_model(model: Callable, guide: Callable, resample: Iterable[str] = ("x",)) -> Callable:
    """A callable taking the model's arguments that runs the guide on them (its sites hidden) and the
    model replayed on the guide's latents, the observed sites ``resample`` redrawn from the model;
    parameters stay module-local while it runs."""
    resample = tuple(resample)

    def guided_model(*args, **kwargs):
        with module_local():
            with poutine.block():
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            with ResampleObserved(resample):
                return poutine.replay(model, trace=guide_trace)(*args, **kwargs)

    return guided_model


__all__ = ["ResampleObserved", "guided_predictive_model"]
