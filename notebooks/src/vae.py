# %% [markdown]
# # The VAE: bounds, samples, traversals and active units
#
# The plain VAE of Kingma & Welling (2014), `vae` in the zoo: $p(z) = \mathcal N(0, I)$,
# $p_\theta(x \mid z)$ Bernoulli, and an amortised guide $q_\phi(z \mid x)$ chosen by name
# (`z_guide`). This tutorial trains it on binarised MNIST digits with the zoo's trainer, loads the run
# with `pyrossl.load_run`, and looks at
#
# 1. the ELBO against the importance-weighted bound (IWAE, Burda et al. 2016) as the number of samples grows,
# 2. samples from the model,
# 3. latent traversals: one unit of $z$ moved while the others stay,
# 4. the KL per unit and the *active units*, those whose posterior mean varies across images.
#
# `PYROSSL_QUICK=1` (what the test suite and the documentation build set) trains a few epochs on a
# subset so the notebook runs in well under three minutes on a CPU; without it the real settings
# (`runs/vae-mnist5k.toml`, binarised, 40 epochs) are used.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import pyrossl
from pyrossl import plots
from pyrossl.config import load_config
from pyrossl.train import train_to_completion

MODE = os.environ.get("PYROSSL_QUICK", "")  # "1": quick; "smoke": the test suite's, every cell on the least work
QUICK, SMOKE = MODE in ("1", "smoke"), MODE == "smoke"
ROOT = Path(pyrossl.__file__).resolve().parents[1]  # the repository: recipes live in runs/
OUT = Path(os.environ.get("PYROSSL_TUTORIALS", "outputs/tutorials"))

settings = ["data.binarize=true", "train.progress=false"]
if QUICK:
    settings += [
        f"train.epochs={5 if SMOKE else 20}",
        "data.limit_per_class=200",
        "data.validation=200",
        "data.test=300",
    ]
config = load_config(ROOT / "runs/vae-mnist5k.toml", settings)
summary = train_to_completion(config, OUT / ("vae-" + MODE if QUICK else "vae"))
print(f"{summary['epochs']} epochs in {summary['seconds']:.1f} s; best epoch {summary['best_epoch']}")

# %% [markdown]
# ## 1. ELBO and the IWAE bound
#
# `load_run` gives back the config, the split and the model with the parameters of the best
# epoch. `log_likelihood(x, k)` is the IWAE estimate
# $\log \frac1k \sum_{j=1}^k p(x, z_j) / q(z_j \mid x)$, $z_j \sim q(z \mid x)$: with $k = 1$ it
# is a one-sample ELBO, and it rises towards $\log p(x)$ as $k$ grows.

# %%
run = pyrossl.load_run(OUT / ("vae-" + MODE if QUICK else "vae"))
x, y = run.tensors("test")
x = x[:300] if QUICK else x
torch.manual_seed(0)
ks = [1, 5, 20, 100] if QUICK else [1, 5, 20, 100, 1000]
bounds = [run.model.log_likelihood(x, k).mean().item() for k in ks]
for k, b in zip(ks, bounds):
    print(f"k = {k:5d}: {b:9.2f} nats")
fig, ax = plt.subplots(figsize=(4.5, 3))
ax.semilogx(ks, bounds, "o-")
ax.set(xlabel="importance samples k", ylabel="bound on log p(x) (nats)", title="ELBO (k = 1) and IWAE bounds")
plt.show()

# %% [markdown]
# ## 2. Samples
#
# `run.sample(n)` draws $z \sim p(z)$ and decodes it: these are pixel probabilities.

# %%
torch.manual_seed(1)
samples = run.sample(64).cpu()
plt.figure(figsize=(5, 5))
plt.imshow(plots.image_grid(samples, nrow=8), cmap="gray")
plt.axis("off")
plt.title("x ~ p(x|z), z ~ N(0, I)")
plt.show()

# %% [markdown]
# ## 3. Latent traversals
#
# Take the posterior mean of one test digit and move one unit of $z$ at a time from -3 to 3,
# the others fixed, one row per unit, the units ordered by their KL (most used first). Each unit
# changes a few strokes of the digit: none of them alone is "the class".

# %%
post = run.posterior(x)
kl = 0.5 * (post["z_loc"] ** 2 + post["z_scale"] ** 2 - 1 - 2 * post["z_scale"].log()).mean(0)
order = kl.argsort(descending=True)
base = post["z_loc"][0]
steps = torch.linspace(-3, 3, 9)
rows = []
for unit in order[:8]:
    z = base.repeat(len(steps), 1)
    z[:, unit] = steps
    rows.append(torch.sigmoid(run.model.decode(z)).cpu())
plt.figure(figsize=(6, 5.5))
plt.imshow(plots.image_grid(torch.cat(rows), nrow=len(steps)), cmap="gray")
plt.yticks([])
plt.xticks([])
plt.ylabel("units, by KL (high to low)")
plt.title("one unit moved from -3 to 3 per row")
plt.show()

# %% [markdown]
# ## 4. KL per unit and active units
#
# After every evaluated epoch the trainer writes the KL of each unit (averaged over the validation
# images) and the number of active units (Burda et al. 2016: $\mathrm{Cov}_x\, \mathbb E_q[z_u] > 0.01$)
# to `metrics.jsonl`; `run.metrics` is that file. Below: the KL per unit of the last evaluated epoch,
# and the same activity statistic recomputed here from the test images.

# %%
last = [r for r in run.metrics if "val_kl_per_unit" in r][-1]
activity = post["z_loc"].var(0)
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].bar(range(len(last["val_kl_per_unit"])), last["val_kl_per_unit"])
axes[0].set(xlabel="unit of z", ylabel="KL (nats)", title=f"KL per unit, epoch {last['epoch']}")
axes[1].bar(range(len(activity)), activity.cpu().numpy())
axes[1].axhline(0.01, color="red", lw=1)
axes[1].set(xlabel="unit of z", ylabel="Cov_x E_q[z_u]", yscale="log", title="activity (red: 0.01)")
plt.tight_layout()
plt.show()
print("active units (validation, from the trainer):", last["val_active_units"], "of", len(activity))
print("active units (test, recomputed):", int((activity > 0.01).sum()))
