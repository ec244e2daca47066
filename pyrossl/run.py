"""A run restored for inspection: :func:`load_run` and :class:`Run` (also ``pyrossl.load_run``).

The layer above the registry: it reads the run folder (:mod:`pyrossl.runs`), rebuilds the data and
the split from the recorded config, builds the entry (:mod:`pyrossl.registry`) and loads its
parameters; nothing below imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch

from pyrossl.config import Config
from pyrossl.distributed import resolve_device
from pyrossl.errors import PyrosslError
from pyrossl.infer.params import module_local
from pyrossl.registry import build_model
from pyrossl.runs import (
    BEST,
    CHECKPOINT,
    load_dataset_for,
    load_parameters,
    read_config,
    read_metrics,
    read_outputs,
    read_summary,
    split_for,
)


@dataclass
class Run:
    """A finished (or stopped) run, restored for inspection: its config, data split and model.

    The model holds the parameters of the best epoch (``which="best"``) or of the last one.
    """

    path: Path
    config: Config
    model: torch.nn.Module
    dataset: object
    split: object
    metrics: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def outputs(self) -> dict:
        """The tables the entry kept in the run and reads again (Serket's codes before and after its
        rounds...), read and checked: ``type(model).read_outputs`` on this run's files."""
        return read_outputs(self.path, self.model)

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of one part of the split: labelled, unlabelled, validation, test, or train (labelled and
        unlabelled)."""
        if part == "train":
            index = torch.cat([self.split.unlabelled, self.split.labelled])
        else:
            index = getattr(self.split, part)
        return self.dataset.x[index].to(self.device), self.dataset.y[index].to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _call(self, what: str, *args):
        method = getattr(self.model, what, None)
        if method is None:
            raise PyrosslError(f"model '{self.config.model}' has no {what}()")
        try:
            with torch.no_grad(), module_local():
                return method(*args)
        except NotImplementedError as exc:
            raise PyrosslError(f"model '{self.config.model}' has no {what}(): {exc}") from None

    def posterior(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The guide's beliefs about the images ``x``: ``y_probs`` (q(y|x)), ``z_loc``/``z_scale`` (q(z|x)),
        ``z`` (a point code), ``cluster_probs`` (p(c|z)) -- each model gives those it has."""
        return self._call("posterior", x.to(self.device))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The class of each image (for the unsupervised GMM-prior VAEs, its cluster)."""
        return self._call("predict", x.to(self.device))

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self._call("latent", x.to(self.device))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self._call("reconstruct", x.to(self.device))

    def sample(self, n: int, y=None) -> torch.Tensor:
        """``n`` images from the model; ``y`` (an int or one per image) picks the class where the model has classes."""
        if y is not None:
            y = torch.as_tensor(y, device=self.device).expand(n)
        return self._call("sample", n, y)

    def posterior_agreement(self, part: str = "validation", images: int = 500, num_samples: int = 16) -> dict:
        """q(y|x) against the generative model's own posterior p(y|x) = p(x, y) / sum_y' p(x, y') (IWAE
        estimates of each p(x, y) with ``num_samples`` draws, seeded 0) on the first ``images`` of
        ``part``: the accuracy of each and how often their classes agree. A semi-supervised model's
        unlabelled term pulls q(y|x) towards p(y|x); where they agree it has nothing left to teach.
        Entries with a ``generative_posterior`` (M2, M1+M2, ADGM, SDGM)."""
        x, y = self.tensors(part)
        x, y = x[:images], y[:images]
        q = self.predict(x)
        pyro.set_rng_seed(0)
        p = self._call("generative_posterior", x, num_samples).argmax(-1)
        return {
            "images": len(y),
            "q_accuracy": (q == y).double().mean().item(),
            "generative_accuracy": (p == y).double().mean().item(),
            "agreement": (p == q).double().mean().item(),
        }

    def predictive(self, num_samples: int, return_sites=None, parallel: bool = False, resample=("x",)):
        """The posterior predictive of the run's Pyro model with its trained guide, a ``pyro.infer.Predictive``.

        Call it with the model's arguments, e.g. ``run.predictive(10)(x)`` or ``(x, y)``: each of the
        ``num_samples`` draws runs the guide on them, then the model at the guide's latents with the
        sites ``resample`` (the images ``x``) drawn afresh, not observed: ``x ~ p(x | z, y)``,
        z ~ q(z | x, y). The result maps every latent site (``z``, ``y``, ...) and the redrawn ``x`` to
        its draws (``return_sites`` picks others). (Pyro's ``Predictive(model, guide=...)`` would first
        run the model alone, with values from the priors, to find its plates: that fails for a prior
        that cannot be sampled, such as the autoencoder's flat one.)
        """
        from pyro.infer import Predictive

        from pyrossl.infer.predictive import guided_predictive_model

        entry = self.model
        return Predictive(
            guided_predictive_model(entry.model, entry.guide, resample),
            num_samples=num_samples,
            return_sites=return_sites,
            parallel=parallel,
        )


def load_run(path: str | Path, which: str = "best", device: str = "cpu") -> Run:
    """Restore a run directory: config, data and split (re-made from the seed), model with parameters.

    ``which`` is ``"best"`` (the epoch with the best validation score) or ``"last"``.
    """
    if which not in ("best", "last"):
        raise PyrosslError(f"which must be 'best' or 'last', not {which!r}")
    path = Path(path)
    config = read_config(path)
    dataset = load_dataset_for(config)
    split = split_for(config, dataset)
    model = build_model(config, dataset.meta())
    state_file = path / (BEST if which == "best" else CHECKPOINT)
    if which == "best" and not state_file.exists():
        state_file = path / CHECKPOINT
    load_parameters(model, state_file)
    model.to(resolve_device(device)).eval()
    return Run(path, config, model, dataset, split, read_metrics(path), read_summary(path))
