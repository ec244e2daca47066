"""M1+M2 (Kingma, Rezende, Mohamed & Welling 2014, section 3.2): M2 on the codes of a VAE (M1).

The two-layer generative model, for each image x,

    y ~ Cat(1/K),  z ~ N(0, I),  c ~ N(mu(y, z), diag sigma(y, z)^2)   (M2 on the code c, Gaussian),
    x ~ Bernoulli(sigmoid(g(c)))                                       (M1's decoder),

with the guide q(c|x) q(y|c) q(z|c, y): q(c|x) is M1's encoder, q(y|c) q(z|c, y) M2's guide on the
code (the label guide ``enum``: y summed out exactly). The ELBO of the pair is M2's bound on the code
plus M1's terms,

    L(x, y) = E_q(c|x) q(z|c,y)[log p(x|c) + log p(c|y, z) + log p(y) + log p(z) - log q(c|x) - log q(z|c, y)],

and U(x) likewise with y summed out. M1 is trained first, as a plain VAE on every training image
(``m1_epochs`` epochs, :meth:`M1M2.pretrain`), or taken from a finished ``vae`` run (``options.m1_run``),
then frozen (``m1_training = "frozen"``, Kingma et al.'s recipe): log p(x|c) - log q(c|x) no longer
depends on a trained parameter, and what is trained is M2 on the codes, each step on a fresh draw
c ~ q(c|x) (``codes = "sample"``) or on the code's mean (``codes = "mean"``: q(c|x) is a point mass,
whose -log q(c|x) is 0; the objective is then M2's ELBO of the mean code plus log p(x|c)).
``m1_training = "joint"`` goes on training M1 with M2 from the pretrained start: the two-layer model
trained end to end.

The entry is :class:`pyrossl.models.m2.M2` with the two layers in ``entry.model`` and ``entry.guide``:
the classifier is q(y|c) at the mean code of q(c|x), and pictures decode M2's mean code through M1.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO
from torch import nn

from pyrossl.config import setting
from pyrossl.errors import ConfigError
from pyrossl.guides.zguide import Z_GUIDES, ZGuideOptions, check_z_guide_options
from pyrossl.infer.objective import SemiSupervisedELBO, particle_settings
from pyrossl.infer.params import register
from pyrossl.models.adgm import LabelledTrace_ELBO
from pyrossl.models.m2 import M2, M2Model
from pyrossl.models.vae import VAE, VAEOptions
from pyrossl.nn import ACTIVATIONS, NETS, check_network_options, pixel_likelihood

CODES = ("sample", "mean")
M1_TRAINING = ("frozen", "joint")
#: the VAE options that fix M1's networks, with the M1+M2 option that sets each
M1_ARCHITECTURE = {"z_dim": "m1_z_dim", "hidden": "m1_hidden", "act": "m1_act", "net": "m1_net"}


@dataclass
class M1M2Options(ZGuideOptions):
    """M2's settings that apply to a model of codes, and M1's. M2's label-guide settings (temperatures,
    noise scales, simplex priors) do not apply: M1+M2 sums its label out (``enum``)."""

    z_dim: int = setting(50, "width of M2's code z")
    hidden: list[int] = setting([500], "widths of M2's hidden layers (its encoders'; its decoder mirrors them)")
    act: str = setting("softplus", "M2's activation between layers: relu | softplus | elu | tanh | gelu")
    shared_trunk: bool = setting(False, "q(y|c) and q(z|c, y) share their first layer h(c)")
    z_kl_weight: float = setting(1.0, "beta of M2's z term (1: the ELBO)")
    aux_weight: float = setting(
        50.0, "alpha of the auxiliary loss -alpha * log q(y|c) on labelled data; 0 turns it off"
    )
    m1_run: str | None = setting(
        None,
        "a finished vae run of the same dataset whose encoder and decoder are M1 (its best checkpoint); None: M1 "
        "is trained first, in this run, for m1_epochs",
    )
    m1_z_dim: int = setting(50, "width of M1's code c (Kingma et al.: 50)")
    m1_hidden: list[int] = setting([600, 600], "M1's hidden layers (Kingma et al.: 600, 600)")
    m1_act: str = setting("softplus", "M1's activation: relu | softplus | elu | tanh | gelu")
    m1_net: str = setting("mlp", "M1's networks: mlp | conv")
    m1_z_guide: str = setting("diag-normal", "M1's q(c|x), a z-guide: diag-normal | lowrank-normal | flow")
    m1_epochs: int = setting(30, "epochs of M1 (a VAE on every training image) before M2, when m1_run is None")
    m1_lr: float = setting(1e-3, "M1's Adam learning rate while it is trained first")
    m1_batch_size: int = setting(200, "M1's batch size while it is trained first")
    codes: str = setting("sample", "what M2 models: sample (c ~ q(c|x), a fresh draw each step) | mean (of q(c|x))")
    m1_training: str = setting(
        "frozen", "frozen: M1 is fixed once trained (Kingma et al.) | joint: M1 is trained on with M2"
    )

    # M2's networks act on the code, a vector; its label is enumerated, so the relaxed and simplex label
    # guides' settings are fixed (class attributes, not options)
    net = "mlp"
    classifier_net = None
    temperature_start = temperature_end = 1.0
    temperature_anneal = 0.0
    sigma = sharpness = dirichlet_concentration = 1.0

    def __post_init__(self):
        check_network_options(self)
        check_z_guide_options(self)
        if not self.aux_weight >= 0 or not self.z_kl_weight > 0:
            raise ConfigError("options.aux_weight must be >= 0 and options.z_kl_weight positive")
        if self.m1_z_dim < 1 or not self.m1_hidden or min(self.m1_hidden) < 1:
            raise ConfigError("options.m1_z_dim must be at least 1, and options.m1_hidden list widths of at least 1")
        if self.m1_act not in ACTIVATIONS:
            raise ConfigError(f"options.m1_act must be one of {', '.join(ACTIVATIONS)}, not '{self.m1_act}'")
        if self.m1_net not in NETS:
            raise ConfigError(f"options.m1_net must be one of {', '.join(NETS)}, not '{self.m1_net}'")
        if self.m1_z_guide not in Z_GUIDES:
            raise ConfigError(f"options.m1_z_guide must be one of {', '.join(Z_GUIDES)}, not '{self.m1_z_guide}'")
        if self.codes not in CODES:
            raise ConfigError(f"options.codes must be one of {', '.join(CODES)}, not '{self.codes}'")
        if self.m1_training not in M1_TRAINING:
            raise ConfigError(f"options.m1_training must be one of {', '.join(M1_TRAINING)}, not '{self.m1_training}'")
        if self.m1_epochs < 1 or self.m1_batch_size < 1 or not self.m1_lr > 0:
            raise ConfigError("options.m1_epochs and options.m1_batch_size must be at least 1, options.m1_lr positive")
        if self.m1_run is not None and (not isinstance(self.m1_run, str) or not self.m1_run.strip()):
            raise ConfigError(f"options.m1_run must be the path of a vae run, not {self.m1_run!r}")

    def m1_options(self) -> VAEOptions:
        return VAEOptions(z_dim=self.m1_z_dim, hidden=list(self.m1_hidden), act=self.m1_act, net=self.m1_net)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class TwoLayerModel(nn.Module):
    """p(y) p(z) p(c|y, z) p(x|c): M2 (:class:`~pyrossl.models.m2.M2Model`, Gaussian, its ``x`` site named
    ``code``) on the code c, and M1's decoder (of the VAE model ``m1``) from c to the pixels x."""

    def __init__(self, m2: M2Model, m1: nn.Module):
        super().__init__()
        m2.x_site = "code"
        self.m2 = m2
        self.m1 = m1

    def decoder(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(y, z) -> pixel logits through M2's mean code, g(mu(y, z)): M2's pictures of the two-layer model."""
        loc, _ = self.m2.decoder(y, z).chunk(2, -1)
        return self.m1.decoder(loc)

    @property
    def z_loc(self) -> torch.Tensor:
        return self.m2.z_loc

    def forward(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, num: int | None = None):
        """Sites in plate ``data``: ``y``, ``z`` (M2's), ``code`` ``[n, m1_z_dim]`` and ``x`` (flat pixels,
        observed when ``x`` is given). ``y``: class indices ``[n]`` or one-hot, observed when given."""
        # a frozen M1 is not Pyro's to optimise (pyro.module would warn per parameter)
        if _trains(self.m1):
            register(self.m1, "TwoLayerModel.m1")
        register(self.m2)
        n = x.shape[0] if x is not None else (y.shape[0] if y is not None else num)
        with pyro.plate("data", n):
            code = self.m2.sites(n, None, y)
            return pyro.sample("x", pixel_likelihood(self.m1.decoder(code)), obs=None if x is None else x.flatten(1))


class TwoLayerGuide(nn.Module):
    """q(c|x) q(y|c) q(z|c, y): M1's encoder draws the ``code`` (a point mass at its mean with
    ``codes = "mean"``), then M2's label guide runs on it. Its classifier, q(y|c) at the mean code, is
    what the entry predicts with."""

    def __init__(self, label_guide: nn.Module, m1_encoder: nn.Module, codes: str = "sample"):
        super().__init__()
        self.label_guide = label_guide
        self.m1_encoder = m1_encoder
        self.codes = codes

    @property
    def label_latent(self):
        return self.label_guide.label_latent

    def code_point(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of q(c|x) (a flow's image of its base mean)."""
        return self.m1_encoder.point(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.label_guide.classify(self.code_point(x))

    def z_moments(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.label_guide.z_moments(self.code_point(x), y)

    def z_point(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.label_guide.z_point(self.code_point(x), y)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Sites in plate ``data``: ``code``, then the label guide's: ``y`` unless given (enumerated), ``z``,
        and with a given y and ``aux_weight`` > 0 the auxiliary ``y_x`` (alpha log q(y|c), c the code drawn).
        The label guide's networks run on the code, which may carry leading sample dimensions."""
        register(self.label_guide, "TwoLayerGuide.label_guide")
        if _trains(self.m1_encoder):  # a frozen M1 is not Pyro's to optimise
            register(self.m1_encoder, "TwoLayerGuide.m1_encoder")
        with pyro.plate("data", x.shape[0]):
            if self.codes == "mean":
                code = pyro.sample("code", dist.Delta(self.code_point(x), event_dim=1))
            else:
                code = pyro.sample("code", self.m1_encoder.distribution(x))
            self.label_guide.sites(code, y)


class M1M2(M2):
    """M2 on the codes of a VAE: see the module's docstring."""

    name = "m1m2"
    description = "M1+M2 (Kingma et al. 2014): M2 with a Gaussian likelihood on the codes of a VAE trained first"
    Options = M1M2Options
    guides = {"enum": "M1's q(c|x), then M2's q(y|c) summed out exactly and q(z|c, y) (Kingma et al. 2014, eq. 7)"}
    default_guide = "enum"
    z_guides = Z_GUIDES
    objectives = ("elbo",)
    objective_limits = {"iwae": "its label y is enumerated, and the IWAE bound needs every latent reparameterised"}
    likelihood = "gaussian"
    samples_title = "M1's decoder at M2's mean code mu(y, z)"

    def data_shape(self, meta: dict) -> tuple[int, ...]:
        """M2's x is M1's code: a vector of ``m1_z_dim``."""
        return (self.options.m1_z_dim,)

    def __init__(self, meta: dict, options: M1M2Options, guide: str = "enum", **settings):
        super().__init__(meta, options, guide, **settings)
        o = options
        m1 = VAE(meta, o.m1_options(), "amortised", z_guide=o.m1_z_guide)
        # M1's model and guide live in the two layers; the VAE entry that trains them first is kept
        # outside the module tree, so the checkpoint holds each parameter once
        object.__setattr__(self, "m1", m1)
        self.model = TwoLayerModel(self.model, m1.model)
        self.guide = TwoLayerGuide(self.guide, m1.guide, o.codes)
        m1.requires_grad_(o.m1_training == "joint")
        # not TraceMeanField_ELBO for the labelled bound: p(c|y, z) depends on z, which q draws after c
        particles = particle_settings(self.objective)
        self.elbo = SemiSupervisedELBO(TraceEnum_ELBO(**particles), LabelledTrace_ELBO(**particles))

    # --- M1 -------------------------------------------------------------------------------------
    def source_runs(self) -> dict[str, str]:
        """``options.m1_run``, where M1 comes from a finished vae run."""
        return {} if self.options.m1_run is None else {"m1_run": self.options.m1_run}

    def pretrain(self, encode_data, seed: int, sources: dict | None = None) -> None:
        """M1 from ``options.m1_run`` (read by the run-folder layer: ``sources["m1_run"]``), or trained here:
        Adam on the VAE's ELBO over every training image, ``m1_epochs`` epochs of ``m1_batch_size``, on
        random streams of its own (seeded by ``seed``)."""
        o = self.options
        if o.m1_run is not None:
            self.load_m1(*sources["m1_run"])
            return
        x = encode_data()["x"]
        self.m1.requires_grad_(True)
        optimizer = torch.optim.Adam(self.m1.parameters(), lr=o.m1_lr)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            order = torch.Generator().manual_seed(seed)
            for _ in range(o.m1_epochs):
                for rows in torch.randperm(x.shape[0], generator=order).split(o.m1_batch_size):
                    optimizer.zero_grad(set_to_none=True)
                    self.m1(x[rows.to(x.device)]).backward()
                    optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.m1.requires_grad_(o.m1_training == "joint")

    def load_m1(self, config, state: dict) -> None:
        """M1's parameters from the model state of a ``vae`` run (its recipe ``config``), checked in one line:
        a vae run of the same dataset, with the networks the ``m1_*`` options describe."""
        where = f"options.m1_run: {self.options.m1_run}"
        if config.model != "vae":
            raise ConfigError(f"{where} is a '{config.model}' run; M1 is a vae run")
        if config.data.name != self.meta["name"]:
            raise ConfigError(f"{where} was trained on '{config.data.name}', this run is on '{self.meta['name']}'")
        theirs = VAE.make_options(config.options)
        ours = self.options.m1_options()
        differ = [
            f"options.{mine} = {getattr(ours, key)!r} but the run has {key} = {getattr(theirs, key)!r}"
            for key, mine in M1_ARCHITECTURE.items()
            if getattr(ours, key) != getattr(theirs, key)
        ]
        if (config.z_guide or "diag-normal") != self.options.m1_z_guide:
            differ.append(
                f"options.m1_z_guide = {self.options.m1_z_guide!r} but the run has z_guide = {config.z_guide!r}"
            )
        if differ:
            raise ConfigError(f"{where} is another M1: {'; '.join(differ)}")
        self.m1.load_state_dict(state)

    @torch.no_grad()
    def m1_elbo(self, x: torch.Tensor, batch_size: int = 1000) -> float:
        """M1's ELBO per image on ``x`` (nats), the VAE's one-sample estimate."""
        total = sum(-self.m1.elbo.loss(self.m1.model, self.m1.guide, xb) for xb in torch.split(x, batch_size))
        return total / x.shape[0]

    latent_title = "means of q(z|c, y = predicted class), c the mean of q(c|x)"

    @torch.no_grad()
    def posterior(self, x):
        """M2's (q(y|c) and q(z|c, y) at the most probable class, c the mean code) and M1's q(c|x)
        (``code_loc``, ``code_scale``: the mean and standard deviation of each unit)."""
        out = super().posterior(x)
        loc, scale = self.guide.m1_encoder.encode(x)
        return {**out, "code_loc": loc, "code_scale": scale}
