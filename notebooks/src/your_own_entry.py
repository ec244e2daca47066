# %% [markdown]
# # Your own zoo entry
#
# A zoo entry is a Pyro model, a guide, and the ELBO that trains them, in one `torch.nn.Module`
# (`pyrossl.zoo.ZooModel`): `entry.model`, `entry.guide` and `entry.elbo`. Write those, register the
# class, and the rest of the zoo takes it like the built-in entries: recipes and `--set`, the trainer
# with its checkpoints and resume, `load_run`, the figures, `ablate`.
#
# The example: a VAE whose prior is a Laplace distribution, $p(z) = \prod_u \mathrm{Laplace}(z_u; 0, 1)$,
# with a Gaussian guide $q(z \mid x)$. The KL between the two has no closed form, so the loss is
# Pyro's Monte Carlo `Trace_ELBO`: $-\mathbb E_{q}[\log p(x \mid z) + \log p(z) - \log q(z \mid x)]$.

# %%
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from IPython.display import Image, display
from torch import nn

import pyrossl
from pyrossl import plots
from pyrossl.config import load_config, setting
from pyrossl.infer.params import register as register_params
from pyrossl.registry import register
from pyrossl.train import train_to_completion
from pyrossl.zoo import ZooModel

MODE = os.environ.get("PYROSSL_QUICK", "")  # "1": quick; "smoke": the test suite's, every cell on the least work
QUICK, SMOKE = MODE in ("1", "smoke"), MODE == "smoke"
OUT = Path(os.environ.get("PYROSSL_TUTORIALS", "outputs/tutorials"))

# %% [markdown]
# ## The model, the guide, the entry
#
# The model names its sample sites (`z`, `x`); the guide provides `z`. Parameters live in the modules,
# so `entry.state_dict()` is the checkpoint. `register(self)` at the top of each `forward` is
# `pyro.module` when Pyro keeps its parameters in the global param store (its default, where a plain
# `pyro.infer.SVI` finds them) and nothing inside the zoo's own calls, which keep them module-local.
# The base class's training loss is the ELBO's per-example mean on each batch. Each option is a
# `setting(default, doc)`: a dataclass field whose doc goes into the entry's option table
# (`LaplaceVAE.option_rows()`, the site's tables).


# %%
@dataclass
class LaplaceVAEOptions:
    z_dim: int = setting(8, "units of the code")
    hidden: int = setting(256, "width of the encoder's and decoder's hidden layer")


class LaplaceVAEModel(nn.Module):
    """p(z) = Laplace(0, 1) per unit, p(x|z) = Bernoulli(decoder(z)) per pixel."""

    def __init__(self, pixels: int, o: LaplaceVAEOptions):
        super().__init__()
        self.z_dim = o.z_dim
        self.decoder = nn.Sequential(nn.Linear(o.z_dim, o.hidden), nn.ReLU(), nn.Linear(o.hidden, pixels))

    def forward(self, x):
        register_params(self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Laplace(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x.flatten(1))


class GaussianGuide(nn.Module):
    """q(z|x) = N(mu(x), diag sigma(x)^2)."""

    def __init__(self, pixels: int, o: LaplaceVAEOptions):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(pixels, o.hidden), nn.ReLU(), nn.Linear(o.hidden, 2 * o.z_dim))

    def forward(self, x):
        register_params(self)
        loc, log_scale = self.net(x.flatten(1)).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
        return loc


class LaplaceVAE(ZooModel):
    name = "laplace-vae"
    description = "VAE with a Laplace prior (a tutorial's entry)"
    Options = LaplaceVAEOptions
    guides = {"amortised": "q(z|x) = N(mu(x), diag sigma(x)^2)"}
    default_guide = "amortised"
    selection_metric = "elbo"
    objectives = ("elbo", "iwae")

    def __init__(self, meta, options, guide="amortised", **settings):
        super().__init__(meta, options, guide, **settings)
        pixels = int(torch.tensor(meta["image_shape"]).prod())
        self.model = LaplaceVAEModel(pixels, options)
        self.guide = GaussianGuide(pixels, options)
        # Trace_ELBO (Monte Carlo KL) with train.particles samples, or the IWAE bound for
        # train.objective = "iwae", which `objectives` below admits: every latent is reparameterised
        self.elbo = self.make_elbo(analytic_kl=False)

    @torch.no_grad()
    def evaluate(self, x, y, batch_size=1000):
        elbo = sum(-self.elbo.loss(self.model, self.guide, xb) for xb in x.split(batch_size)) / x.shape[0]
        return {"elbo": elbo}

    @torch.no_grad()
    def latent(self, x):  # the code figures and notebooks draw
        return self.guide(x)

    @torch.no_grad()
    def sample(self, n, y=None):
        z = dist.Laplace(torch.zeros(n, self.options.z_dim), 1.0).sample()
        return torch.sigmoid(self.model.decoder(z)).reshape(n, *self.meta["image_shape"])


register(LaplaceVAE, replace=True)

# %% [markdown]
# ## Train it like any entry
#
# A recipe is data: here a dict instead of a TOML file, with the same keys. The trainer checks it
# (an unknown option is refused with the closest valid name), trains, evaluates every epoch,
# checkpoints, and draws the standard figures.

# %%
recipe = {
    "model": "laplace-vae",
    "seed": 0,
    "data": {"name": "mnist5k", "labels_per_class": 0, "validation": 500, "test": 500, "binarize": True},
    "train": {"epochs": 3 if SMOKE else 8 if QUICK else 40, "batch_size": 100, "lr": 1e-3, "progress": False},
    "options": {"z_dim": 8, "hidden": 256},
}
run_dir = OUT / ("laplace-vae-" + MODE if QUICK else "laplace-vae")
summary = train_to_completion(load_config(base=recipe), run_dir)
print(
    f"test ELBO {summary['best']['test_elbo']:.2f} nats at epoch {summary['best_epoch']}; files: "
    + ", ".join(sorted(p.name for p in run_dir.iterdir()))
)

# %% [markdown]
# ## Load it back and look
#
# `load_run` rebuilds the entry from the run directory (config, split, parameters of the best epoch).

# %%
run = pyrossl.load_run(run_dir)
x, y = run.tensors("test")
z = run.latent(x).cpu()
fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
axes[0].imshow(plots.image_grid(run.sample(36).cpu(), nrow=6), cmap="gray")
axes[0].set_title("x ~ p(x|z), z ~ Laplace(0, 1)")
axes[0].axis("off")
axes[1].hist(z.flatten().numpy(), bins=80, density=True, alpha=0.7, label="posterior means, every unit")
grid = torch.linspace(-4, 4, 200)
axes[1].plot(grid, 0.5 * torch.exp(-grid.abs()), label="prior Laplace(0, 1)")
axes[1].legend()
axes[1].set_title("the codes against the prior")
plt.tight_layout()
plt.show()

# %% [markdown]
# The codes of the test digits, coloured by class (the labels were never used in training):

# %%
display(
    Image(
        filename=str(
            plots.plot_latent_pca(z, y.cpu(), run_dir / "figures" / "latent_pca_again.png", classes=run.dataset.classes)
        )
    )
)
