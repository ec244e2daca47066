"""What every zoo entry is: a Pyro model, a guide, and the loss that trains them, in one ``nn.Module``.

The contract, the same for every entry (built-in or your own):

- ``entry.model`` and ``entry.guide`` are Pyro callables (``nn.Module`` s whose ``forward`` is the model or
  guide) taking the same batch arguments: ``(x)`` for an unlabelled batch, ``(x, y)`` for a labelled one
  (each entry's page lists its arguments, their shapes and its sample sites). Models name their sample
  sites; guides provide them.
- ``entry.elbo`` is a ``pyro.infer.ELBO`` whose ``loss``, ``loss_and_grads`` and ``differentiable_loss``
  agree, so ``pyro.infer.SVI(entry.model, entry.guide, pyro.optim.Adam(...), entry.elbo)`` trains the
  entry with Pyro alone (its parameters then go through Pyro's param store, see
  :mod:`pyrossl.infer.params`).
- ``forward`` *is* the training loss, made of ``entry.elbo`` on the step's batches and nothing else:
  ``elbo.differentiable_loss(model, guide, x) / len(x)
  + elbo.differentiable_loss(model, guide, x_lab, y_lab) / len(x_lab)``
  (the per-example means of the unlabelled and the labelled bound). ``torch.optim`` optimises
  ``entry.parameters()``, ``entry.state_dict()`` is the checkpoint, and ``DistributedDataParallel`` can
  wrap the entry unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pyro.infer import ELBO
from torch import nn

from pyrossl.config import build_dataclass, option_rows
from pyrossl.errors import ConfigError
from pyrossl.guides.zguide import DEFAULT_Z_GUIDE, Z_GUIDES
from pyrossl.infer.objective import OBJECTIVES, Objective, make_elbo
from pyrossl.infer.params import module_local, with_module_local


class ZooModel(nn.Module):
    """Base class of the zoo's entries.

    Subclasses set the class attributes and implement :meth:`forward`, :meth:`evaluation_counts` and
    :meth:`metrics_from_counts` (or :meth:`evaluate` alone);
    everything else has a sensible default. ``meta`` is :meth:`pyrossl.data.Dataset.meta`: all a model
    may know about the data (image shape, number of classes, names).
    """

    #: name in the registry and in recipes
    name: ClassVar[str]
    #: dataclass of the model's and guides' settings (the recipe's ``[options]``)
    Options: ClassVar[type]
    #: guide name -> one-line description; the registry checks ``guide =`` against it
    guides: ClassVar[dict[str, str]]
    default_guide: ClassVar[str]
    #: former guide names that recipes and run directories may still hold -> today's name
    guide_aliases: ClassVar[dict[str, str]] = {}
    #: whether the trainer feeds labelled batches (``x_lab``, ``y_lab``) to :meth:`forward`
    uses_labels: ClassVar[bool] = False
    #: whether it trains on unlabelled batches too (False: labelled batches only)
    uses_unlabelled: ClassVar[bool] = True
    #: whether :meth:`forward` takes ``index=``: the dataset rows of the unlabelled batch (per-example state)
    wants_index: ClassVar[bool] = False
    #: whether the training examples are evaluated too (``train_`` metrics: unsupervised clustering is
    #: scored on the points it clusters; their labels are used for scoring only)
    evaluate_on_train: ClassVar[bool] = False
    #: the validation metric (higher is better) that picks the best epoch
    selection_metric: ClassVar[str] = "elbo"
    #: one line for `pyrossl list`
    description: ClassVar[str] = ""
    #: z-guide name -> description: the guides of the continuous code it takes (``z_guide =``); empty
    #: for entries without a Gaussian code
    z_guides: ClassVar[dict[str, str]] = {}
    #: the ``train.objective`` values it trains with
    objectives: ClassVar[tuple[str, ...]] = ("elbo",)
    #: objective -> why the entry cannot train with it (the reason a refusal gives)
    objective_limits: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs):
        """Every public method an entry defines (and ``__call__``, hence ``forward``) runs with parameters
        module-local (:func:`~pyrossl.infer.params.module_local`): the zoo's own calls never touch Pyro's
        param store, whatever the caller's setting. ``entry.model`` and ``entry.guide`` called by
        themselves, as ``pyro.infer.SVI`` calls them, follow the caller's setting."""
        super().__init_subclass__(**kwargs)
        for attr, value in list(vars(cls).items()):
            if not attr.startswith("_") and inspect.isfunction(value) and not getattr(value, "_module_local", False):
                wrapped = with_module_local(value)
                wrapped._module_local = True
                setattr(cls, attr, wrapped)

    def __call__(self, *args, **kwargs):
        with module_local():
            return super().__call__(*args, **kwargs)

    def __init__(
        self, meta: dict, options: Any, guide: str, z_guide: str | None = None, objective: Objective | None = None
    ):
        super().__init__()
        self.meta = dict(meta)
        self.options = options
        self.guide_name = guide
        self.z_guide_name = z_guide or (DEFAULT_Z_GUIDE if self.z_guides else None)
        self.objective = objective or Objective()

    @classmethod
    def check_objective(cls, guide: str, z_guide: str | None, objective: Objective) -> None:
        """A ConfigError where ``train.objective`` cannot train this entry with these guides."""
        if objective.name not in OBJECTIVES:
            raise ConfigError(f"train.objective must be one of {', '.join(OBJECTIVES)}, not '{objective.name}'")
        if objective.particles < 1:
            raise ConfigError(f"train.particles must be at least 1, not {objective.particles}")
        if objective.name not in cls.objectives:
            reason = (
                cls.objective_limits.get(objective.name)
                or f"{cls.__name__}.objectives lists {', '.join(cls.objectives)} only"
            )
            raise ConfigError(f"train.objective '{objective.name}' does not fit model '{cls.name}': {reason}")

    def check_elbo(self) -> None:
        """A ConfigError where ``entry.elbo`` would not honour ``train.particles`` (an ELBO built with
        Pyro's default of one particle, say): called once the entry is built, before training."""
        elbo = getattr(self, "elbo", None)
        if not isinstance(elbo, ELBO):
            raise ConfigError(
                f"model '{self.name}' has no entry.elbo (a pyro.infer.ELBO): set self.elbo in __init__ "
                "(ZooModel.make_elbo builds one from train.objective and train.particles)"
            )
        if elbo.num_particles != self.objective.particles:
            raise ConfigError(
                f"model '{self.name}' does not honour train.particles = {self.objective.particles}: its elbo "
                f"has num_particles = {elbo.num_particles} (build it with ZooModel.make_elbo)"
            )

    def make_elbo(
        self, enumerated: bool = False, objective: Objective | None = None, analytic_kl: bool | None = None
    ) -> ELBO:
        """The Pyro ELBO of ``objective`` (default: ``train.objective`` / ``train.particles``): IWAE, or the
        ELBO with ``particles`` samples, ``TraceEnum_ELBO`` where a site is ``enumerated``, analytic KLs
        (``TraceMeanField_ELBO``) where ``analytic_kl`` (default: as the entry's z-guide says), else
        ``Trace_ELBO`` (:func:`pyrossl.infer.objective.make_elbo`)."""
        if analytic_kl is None:
            analytic_kl = self.z_guide_name is None or Z_GUIDES.cls(self.z_guide_name).analytic_kl
        return make_elbo(objective or self.objective, enumerated=enumerated, analytic_kl=analytic_kl)

    @classmethod
    def make_options(cls, values: dict) -> Any:
        """The model's Options from a recipe's ``[options]`` table (unknown keys are errors)."""
        return build_dataclass(cls.Options, values, where="options.")

    @classmethod
    def option_rows(cls) -> list[dict[str, str]]:
        """Every setting of ``cls.Options``: ``name``, ``type``, ``default`` and ``doc`` (each field's
        ``metadata["doc"]``, see :func:`pyrossl.config.setting`), base classes' fields first. What the
        documentation's option tables are made of, so they cannot drift from the code."""
        return option_rows(cls.Options)

    @classmethod
    def options_dict(cls, options: Any) -> dict:
        return dataclasses.asdict(options)

    # --- training -------------------------------------------------------------------------
    #: the Pyro model, guide and ELBO of the contract (set by each entry's ``__init__``)
    model: nn.Module
    guide: nn.Module
    elbo: ELBO

    def loss_module(self):
        """``entry.elbo(entry.model, entry.guide)``: Pyro's ``ELBOModule``, whose ``forward(*batch)`` is the
        ELBO's ``differentiable_loss`` (summed over the batch)."""
        return self.elbo(self.model, self.guide)

    def forward(
        self, x: torch.Tensor | None, x_lab: torch.Tensor | None = None, y_lab: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss to minimise for one step (a scalar): the per-example mean of ``entry.elbo`` on the
        unlabelled batch ``x`` plus that on the labelled batch ``(x_lab, y_lab)``, each where given."""
        terms = []
        if x is not None:
            terms.append(self.elbo.differentiable_loss(self.model, self.guide, x) / x.shape[0])
        if x_lab is not None:
            terms.append(self.elbo.differentiable_loss(self.model, self.guide, x_lab, y_lab) / x_lab.shape[0])
        if not terms:
            raise ValueError("a training step needs an unlabelled or a labelled batch")
        return sum(terms)

    def check_split(self, split, dataset) -> None:
        """Called once before training with the split (:class:`pyrossl.data.Split`: ``sizes()`` gives
        the number of ``labelled``, ``unlabelled``, ``validation`` and ``test`` examples) and its dataset:
        raise a ConfigError naming the limit when the data cannot serve this entry (a mixture needs as
        many points as components, say). The default accepts any."""

    def prepare(self, encode_data: Callable[[], dict]) -> None:
        """Called once before training starts or resumes, with :meth:`end_epoch`'s ``encode_data`` (the
        training tensors on demand, so an entry that needs nothing costs nothing): for what the data
        fixes before any step, such as a label prior from the labelled examples. Must be a function of
        the data alone."""

    def source_runs(self) -> dict[str, str]:
        """Finished runs the entry takes parts of before it trains, as ``{option name: run directory}``
        (M1+M2's ``m1_run``): the run-folder layer reads each one's recipe and best checkpoint and hands
        them to :meth:`pretrain`. The default names none."""
        return {}

    def pretrain(self, encode_data: Callable[[], dict], seed: int, sources: dict | None = None) -> None:
        """Called once before the first step of a fresh run, after :meth:`prepare` (not on a resume: the
        checkpoint holds what it made), with the training tensors on demand, the run's seed and the
        :meth:`source_runs` read (``{option name: (Config, model state dict)}``): a stage that trains or
        loads part of the entry first, such as M1+M2's VAE. It must draw from random streams of its own
        (``torch.random.fork_rng``), so that the run's training stream is the same with or without it.
        The default does nothing."""

    def start_epoch(self, epoch: int) -> dict:
        """Called before each epoch (1-based): update schedules; returns values to log (e.g. temperature)."""
        return {}

    def end_epoch(self, epoch: int, encode_data: Callable[[], dict], evaluating: bool = True) -> dict:
        """Called after each epoch's steps: a non-SVI stage (a mixture fit, say) may run here.

        ``encode_data()`` gives the training tensors on demand: ``x`` (every training image), ``index``
        (their dataset rows) and ``x_labelled``, ``y_labelled`` (the labelled ones). ``evaluating`` says
        whether the model is evaluated after this epoch (``train.eval_every``; always after the last one), so a costly
        stage that only evaluation needs can wait. Returns values to log.
        """
        return {}

    @classmethod
    def read_outputs(cls, files, options) -> dict:
        """What the entry reads again (for its figures) of the tables :meth:`epoch_outputs` kept.

        ``files`` reads the run directory (:class:`pyrossl.runs.RunFiles`: ``files.exists(name)``,
        ``files.table(name, shape=..., dtype=...)``, names relative to the run), checked: a damaged
        table is a CheckpointError naming the file. Called before a run is resumed or redrawn, so that
        nothing is rewritten on the way to that error; the result reaches :meth:`figures`.
        """
        return {}

    def epoch_outputs(self, epoch: int, labels: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Called after every epoch (rank 0): the tables the entry keeps in its run directory, as
        ``{name relative to the run: (array, numpy format)}``; the run-folder layer writes them
        (atomically). ``labels(index)`` gives the true labels of dataset rows, for scoring only."""
        return {}

    # --- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluation_counts(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict[str, torch.Tensor]:
        """Sums and counts over the examples ``x, y`` (``batch_size`` at a time) that the metrics are made of.

        Those of disjoint parts of a set add up to those of the whole set: tables of label pairs
        (:func:`pyrossl.evaluate.label_table`), sums of per-example losses, the number of examples.
        With several processes each one computes them on its share of the set, the trainer adds them
        up and :meth:`metrics_from_counts` turns the sums into the metrics a single process would get.
        """
        raise NotImplementedError

    def metrics_from_counts(self, counts: dict[str, torch.Tensor]) -> dict:
        """The metrics (names without a prefix) of the summed :meth:`evaluation_counts`."""
        raise NotImplementedError

    @classmethod
    def splits_evaluation(cls) -> bool:
        """Whether the entry gives :meth:`evaluation_counts` (else, with several processes, rank 0 evaluates alone)."""
        return cls.evaluation_counts is not ZooModel.evaluation_counts

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict:
        """Metrics on a held-out set (names without a prefix; the trainer adds ``val_``/``test_``)."""
        return self.metrics_from_counts(self.evaluation_counts(x, y, batch_size))

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, num_samples: int, batch_size: int = 100) -> torch.Tensor:
        """Per-example importance-weighted estimate of log p(x) (nats); models without one raise."""
        raise NotImplementedError(f"{self.name} has no likelihood estimate")

    @torch.no_grad()
    def elbo_estimate(self, x: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
        """Per-example one-sample estimate of the guide's ELBO, E_q[log p(x, z) - log q(z|x)] (nats, every
        weight 1): by default the importance-weighted bound with one sample, which is that estimate.
        Beside :meth:`log_likelihood` it measures the gap IWAE - ELBO, a lower estimate of KL(q || p(z|x))."""
        return self.log_likelihood(x, 1, batch_size)

    # --- the continuous code -----------------------------------------------------------------
    @torch.no_grad()
    def code_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and variance of each unit of z under q(z|x), ``[n, d]`` each (entries with a Gaussian code)."""
        raise NotImplementedError(f"{self.name} has no continuous code")

    @torch.no_grad()
    def prior_moments(self, x: torch.Tensor, code_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and variance of each unit of z under the prior the images ``x`` are scored with
        (broadcastable to ``[n, d]``): N(0, 1) unless the entry says otherwise."""
        return torch.zeros_like(code_mean), torch.ones_like(code_mean)

    @torch.no_grad()
    def code_counts(self, x: torch.Tensor, batch_size: int = 1000) -> dict[str, torch.Tensor]:
        """Sums over the images of the KL of each unit and of the posterior means and their squares
        (they add up over disjoint parts, like :meth:`evaluation_counts`); empty without a code.

        The KL of unit u is that of the Gaussians with q's and the prior's moments of z_u,
        KL_u = 1/2 (log(s_p / s_q) + (s_q + (m_q - m_p)^2) / s_p - 1) (s: variances): exact for
        the Gaussian z-guides and a Gaussian prior, a moment-matched approximation for a flow or a
        mixture prior. The units' KLs sum to the KL of mean-field q only; a correlated q's total KL is
        smaller by the units' multi-information.
        """
        if not self.z_guides:
            return {}
        kl = mean = mean_sq = 0.0
        for xb in torch.split(x, batch_size):
            m, v = self.code_moments(xb)
            pm, pv = self.prior_moments(xb, m)
            kl_b = 0.5 * (torch.log(pv / v) + (v + (m - pm) ** 2) / pv - 1)
            kl, mean, mean_sq = kl + kl_b.double().sum(0), mean + m.double().sum(0), mean_sq + (m.double() ** 2).sum(0)
        return {"code_kl": kl, "code_mean": mean, "code_mean_sq": mean_sq, "code_count": torch.tensor(x.shape[0])}

    @staticmethod
    def code_metrics(counts: dict[str, torch.Tensor]) -> dict:
        """``kl_per_unit`` (nats, mean over the images) and ``active_units``: units whose posterior mean
        varies over the images, Cov_x(E_q[z_u]) > 0.01 (Burda et al. 2016, section 5.2)."""
        if not counts or not int(counts["code_count"]):
            return {}
        n = float(counts["code_count"])
        variance = counts["code_mean_sq"] / n - (counts["code_mean"] / n) ** 2
        return {"kl_per_unit": (counts["code_kl"] / n).tolist(), "active_units": int((variance > 0.01).sum())}

    # --- inspection -----------------------------------------------------------------------
    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the guide believes about a batch ``x``, as tensors with one row per image.

        Keys (each entry gives those it has): ``y_probs`` (q(y|x) class probabilities), ``z_loc`` and
        ``z_scale`` (the Gaussian q(z|x)), ``z`` (a point estimate where the guide is a delta),
        ``cluster_probs`` (p(c|z) at the mean code, for the GMM-prior VAEs).
        """
        raise NotImplementedError(f"{self.name} does not describe its posterior")

    #: what :meth:`latent` returns, in the latent figure's title
    latent_title = "posterior means of q(z|x)"

    @torch.no_grad()
    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean of the continuous latent code."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded posterior mean, as pixel probabilities with x's shape."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` images from the generative model (of classes ``y`` where the model is conditional)."""
        raise NotImplementedError

    def figures(self, x: torch.Tensor, y: torch.Tensor, outputs: dict | None = None) -> list:
        """The model's own figures of a trained run, as :class:`pyrossl.figures.Figure` specs that the
        report layer draws: ``x, y`` a stratified sample of the figure part, ``outputs`` what
        :meth:`read_outputs` read of the run."""
        return []


class ELBOModuleEntry:
    """Mixin for entries that keep Pyro's ``ELBOModule`` as ``self.loss`` (``self.make_elbo()(model, guide)``):
    ``entry.model``, ``entry.guide`` and ``entry.elbo`` are its three parts (its parameters' names start with
    ``loss.``, as checkpoints have them)."""

    @property
    def model(self) -> nn.Module:
        return self.loss.model

    @property
    def guide(self) -> nn.Module:
        return self.loss.guide

    @property
    def elbo(self) -> ELBO:
        return self.loss.elbo


class LabelClassifier:
    """Mixin for entries with a classifier network q(y|x) (``classifier_network``): predictions and accuracy."""

    @property
    def classifier_network(self) -> nn.Module:
        raise NotImplementedError

    @torch.no_grad()
    def class_logits(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        return torch.cat([self.classifier_network(xb) for xb in torch.split(x, batch_size)])

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_logits(x).argmax(-1)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_logits(x).softmax(-1)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y_probs": self.predict_proba(x)}

    @torch.no_grad()
    def evaluation_counts(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict[str, torch.Tensor]:
        from pyrossl.evaluate import label_table

        k = self.meta["num_classes"]
        return {"labels": label_table(self.class_logits(x, batch_size).argmax(-1), y, k, k)}

    def metrics_from_counts(self, counts: dict[str, torch.Tensor]) -> dict:
        from pyrossl.evaluate import classification_metrics, pairs_from_table

        return classification_metrics(*pairs_from_table(counts["labels"]), self.meta["num_classes"])
