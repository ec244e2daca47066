"""Importance weights of a Pyro model and guide, vectorised over samples.

The importance-weighted bound (Burda et al. 2016, eq. 8) of log p(x) with k samples z_i ~ q(z|x) is

    L_k(x) = log (1/k) sum_i p(x, z_i) / q(z_i | x),

a lower bound of log p(x) that tightens as k grows (L_1 is the ELBO). It works for any model and
guide of the zoo whose data plate (the only plate) is the rightmost batch dimension: the k samples run in parallel
in an extra plate to its left, and discrete sites of the guide are sampled, not enumerated.
The per-example bound is :func:`pyrossl.evaluate.iwae_log_likelihood` of these weights.
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine


def importance_log_weights(model, guide, *args, num_samples: int, max_plate_nesting: int = 1, **kwargs) -> torch.Tensor:
    """log p(x, z_i) - log q(z_i | x) for ``num_samples`` samples: a tensor ``[num_samples, batch]``."""
    with pyro.plate("importance_samples", num_samples, dim=-(max_plate_nesting + 1)):
        guide_trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            poutine.replay(poutine.block(model, hide_types=["param"]), trace=guide_trace)
        ).get_trace(*args, **kwargs)
    log_w = 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob()
        for site in trace.nodes.values():
            # an observed guide site (a supervised term of the guide, such as M2's log q(y|x)) is no latent
            if (
                site["type"] == "sample"
                and site["name"] != "importance_samples"
                and not (sign < 0 and site["is_observed"])
            ):
                # unscaled: weights such as a beta-VAE's KL scale shape training, not the likelihood
                log_w = log_w + sign * site["unscaled_log_prob"]
    return torch.as_tensor(log_w).reshape(num_samples, -1)
