"""KL warm-up: the latent terms of any model/guide pair's ELBO weighted by a factor, without editing either.

Bowman et al. (2016) and Sønderby et al. (2016) train a VAE on

    L_w(x) = E_q[log p(x | z)] - w KL(q(z | x) || p(z)),    w rising from 0 to 1,

so that the decoder learns to use the code before the KL term pulls q(z | x) to the prior. Pyro's
examples put a ``poutine.scale`` around each latent ``pyro.sample`` of the model and the guide
(the deep Markov model's ``annealing_factor``), which needs both programs edited. Here one handler
around the ELBO does it for whatever model and guide run inside: every *latent* sample site (not
observed) has its log-density multiplied by ``w`` in the model and in the guide alike, so each
latent term log p(z) - log q(z) (a KL in expectation, or in closed form under ``TraceMeanField_ELBO``,
which scales the KL by the guide site's scale) is weighted by ``w``, while the likelihood, observed
labels and the guides' observed auxiliary terms are not. With ``w < 1`` the loss is not a bound on
log p(x): a warm-up's values are not comparable with a finished run's, and the trainer evaluates
with ``w = 1`` (evaluation runs outside the handler).
"""

from __future__ import annotations

from pyro.poutine.messenger import Messenger


class LatentScaleMessenger(Messenger):
    """Multiply the log-density of every latent (unobserved) sample site by ``weight`` (a float >= 0):
    ``with LatentScaleMessenger(0.3): loss = elbo.differentiable_loss(model, guide, x)``."""

    def __init__(self, weight: float):
        if not weight >= 0:
            raise ValueError(f"the latent terms' weight must be at least 0, not {weight}")
        super().__init__()
        self.weight = float(weight)

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.weight * msg["scale"]


def warmup_weight(epochs_done: float, warmup_epochs: int) -> float:
    """The weight of the latent terms of a linear warm-up over ``warmup_epochs`` epochs, after
    ``epochs_done`` epochs of training (a fraction within an epoch: the step being taken included):
    min(1, epochs_done / warmup_epochs); 1 without a warm-up."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, epochs_done / warmup_epochs)
