# %% [markdown]
# # Inspect the posterior of a trained run
#
# This notebook trains nothing. It loads a finished run directory with `pyrossl.load_run` and looks at
# what the model learned: the guide's posterior for a few test images, the latent space coloured by
# class, samples of each class, the learning curves, and posterior-predictive draws.
#
# Make a run first, e.g. `pyrossl train runs/m2-digits.toml --out outputs/m2-digits-seed0` (seconds on a
# CPU), then point `PYROSSL_RUN` at it (the default is that folder).

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import pyrossl
from pyrossl import plots
from pyrossl.data.splits import figure_sample

RUN_DIR = Path(os.environ.get("PYROSSL_RUN", "outputs/m2-digits-seed0"))
run = pyrossl.load_run(RUN_DIR)  # parameters of the best epoch, on the CPU
print(run.config.model, "/", run.config.guide, "on", run.config.data.name, "- seed", run.config.seed)
print({k: round(v, 4) for k, v in run.summary["best"].items() if k.startswith("test_") and isinstance(v, float)})

# %% [markdown]
# ## The posterior of a few test images
#
# `run.posterior(x)` gives the guide's beliefs: q(y|x) as class probabilities, q(z|x) as location and
# scale (M2's q(z|x, y) at the most probable class).

# %%
x, y = run.tensors("test")
shown = figure_sample(y, 6, seed=0)  # six images of six classes: the test part is stored sorted by class
x, y = x[shown], y[shown]
post = run.posterior(x)
print({k: tuple(v.shape) for k, v in post.items()})
classes = [str(c) for c in run.dataset.classes]
fig, axes = plt.subplots(2, len(x), figsize=(2 * len(x), 4))
for i in range(len(x)):
    axes[0, i].imshow(x[i, 0], cmap="gray_r")
    axes[0, i].set_title(f"true {classes[y[i]]}")
    axes[0, i].axis("off")
    if "y_probs" in post:
        axes[1, i].bar(range(len(classes)), post["y_probs"][i].numpy())
        axes[1, i].set_xticks(range(len(classes)), classes, fontsize=6)
        axes[1, i].set_ylim(0, 1)
fig.suptitle("test images and q(y|x)")
fig.tight_layout()
if "z_scale" in post:
    print("mean posterior sd of z per image:", post["z_scale"].mean(-1).numpy().round(3))

# %% [markdown]
# ## The latent space, coloured by class
#
# Posterior means of every test image on their first two principal components.

# %%
x_all, y_all = run.tensors("test")
z = run.latent(x_all)
fig, ax = plt.subplots(figsize=(5, 4.5))
plots.plot_latent_pca(z, y_all, None, classes=classes, ax=ax)
ax.set_title(f"posterior means, {len(z)} test images")
# %% [markdown]
# ## Samples of each class
#
# `run.sample(n, y=k)` draws from p(x|y=k, z) with z from its prior: one row per class.

# %%
rows = torch.cat([run.sample(8, y=k) for k in range(len(classes))])
grid = plots.image_grid(rows, nrow=8)
fig, ax = plt.subplots(figsize=(5, 0.6 * len(classes)))
ax.imshow(grid, cmap="gray_r")
ax.set_yticks([(i + 0.5) * grid.shape[0] / len(classes) for i in range(len(classes))], classes)
ax.set_xticks([])
ax.set_title("one class per row")
# %% [markdown]
# ## Learning curves
#
# `run.metrics` is `metrics.jsonl` as a list of dicts, one per epoch.

# %%
epochs = [r["epoch"] for r in run.metrics if "val_accuracy" in r]
fig, ax = plt.subplots(figsize=(5, 3.5))
for key in ("val_accuracy", "test_accuracy"):
    values = [r[key] for r in run.metrics if key in r]
    if values:
        ax.plot(epochs[: len(values)], values, marker="o", label=key)
ax.set_xlabel("epoch")
ax.set_ylabel("accuracy")
ax.legend()
# %% [markdown]
# ## Posterior predictive
#
# `run.predictive(n)` is a `pyro.infer.Predictive` over the run's Pyro model with its trained guide;
# call it with the model's arguments.

# %%
draws = run.predictive(num_samples=4)(x)
print({site: tuple(value.shape) for site, value in draws.items()})
