# %% [markdown]
# # Gaussian Auto Embeddings
#
# The recipe of the Gaussian Auto Embeddings posts: train a plain autoencoder, then fit one Gaussian
# mixture per class to the codes of the labelled images. The mixtures make the autoencoder a
# classifier ($p(c \mid z) \propto p(c)\, p(z \mid c)$), a class-conditional generator (decode
# $z \sim p(z \mid c)$), and a novelty detector (an image whose code is unlikely under every class
# is "none of the classes"). In the zoo the autoencoder is written in Pyro as the degenerate VAE:
# a flat prior and a point-mass guide $q(z \mid x) = \delta(z - f(x))$, so the ELBO is the
# reconstruction log-likelihood.
#
# This tutorial reproduces the posts' figures on the 5,000 MNIST digits: reconstructions, samples
# per class, one row per mixture component ("styles"), transitions between two classes, the
# "manifold evidence", per-class mixtures against one mixture for all, and novelty on another
# dataset. `PYROSSL_QUICK=1` trains fewer epochs.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Image, display

import pyrossl
from pyrossl import plots
from pyrossl.config import load_config
from pyrossl.data import load_dataset
from pyrossl.errors import DataError
from pyrossl.evaluate import confusion_matrix
from pyrossl.train import train_to_completion

MODE = os.environ.get("PYROSSL_QUICK", "")  # "1": quick; "smoke": the test suite's, every cell on the least work
QUICK, SMOKE = MODE in ("1", "smoke"), MODE == "smoke"
ROOT = Path(pyrossl.__file__).resolve().parents[1]
OUT = Path(os.environ.get("PYROSSL_TUTORIALS", "outputs/tutorials")) / ("gae-" + MODE if QUICK else "gae")
epochs = 5 if SMOKE else 20
settings = ["train.progress=false"] + ([f"train.epochs={epochs}", f"train.eval_every={epochs}"] if QUICK else [])
summary = train_to_completion(load_config(ROOT / "runs/gae-mnist5k.toml", settings), OUT)
run = pyrossl.load_run(OUT)
model = run.model
x, y = run.tensors("test")
print(
    f"test accuracy of the class mixtures: {summary['best']['test_accuracy']:.3f}; "
    f"{summary['epochs']} epochs in {summary['seconds']:.0f} s"
)


def show(images, nrow, title, rows=None):
    plt.figure(figsize=(nrow * 0.6, (len(images) // nrow) * 0.6 + 0.5))
    plt.imshow(plots.image_grid(images.cpu(), nrow=nrow), cmap="gray")
    plt.title(title)
    plt.axis("off")
    plt.show()


# %% [markdown]
# ## Reconstructions
#
# Top: test digits (one of each class); bottom: $\mathrm{decoder}(f(x))$.

# %%
one_each = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(10)])
show(torch.cat([x[one_each], model.reconstruct(x[one_each])]), 10, "test digits and their reconstructions")

# %% [markdown]
# ## Samples per class, and the styles of one class
#
# Each row decodes ten codes drawn from one class's mixture $p(z \mid c)$. Then the mixture of one
# class, component by component (heaviest first): each component is a "style" of writing that digit.

# %%
g = torch.Generator().manual_seed(0)
k = model.meta["num_classes"]
show(model.sample(10 * k, torch.arange(k).repeat_interleave(10), generator=g), 10, "z ~ p(z|c), one class per row")
show(model.sample_styles(7, generator=g), 10, "class 7: one mixture component (style) per row")

# %% [markdown]
# ## Transitions between two classes
#
# Draw a code from the mixture of one class and one from another, and decode the straight line
# between them (in the standardised space the mixtures live in).

# %%
rows = []
for a, b in [(1, 7), (3, 8), (4, 9), (0, 6)]:
    za, _ = model.classifier.sample(1, torch.tensor([a]), generator=g)
    zb, _ = model.classifier.sample(1, torch.tensor([b]), generator=g)
    t = torch.linspace(0, 1, 10)[:, None]
    rows.append(model.decode(model._unstandardise((1 - t) * za + t * zb)))
show(torch.cat(rows), 10, "from a sample of one class to a sample of another: 1→7, 3→8, 4→9, 0→6")

# %% [markdown]
# ## The manifold evidence
#
# The codes of real digits fill a small part of the latent space. The posts decode points drawn
# uniformly over the box that holds the training codes and get gibberish. Here the decoder makes
# something stroke-like of almost any code, but the uniform points (top rows) give smudged, mixed
# shapes where the mixtures' samples (bottom rows) give clean digits, and the mixtures'
# log-density tells the two apart by thousands of nats.

# %%
train_x, _ = run.tensors("train")
codes = model.codes(train_x)
low, high = codes.min(0).values, codes.max(0).values
uniform = low + (high - low) * torch.rand(20, codes.shape[1], generator=g)
mixture, _ = model.classifier.sample(20, generator=g)
show(
    torch.cat([model.decode(model._unstandardise(uniform)), model.decode(model._unstandardise(mixture))]),
    10,
    "top: uniform over the codes' box; bottom: from the mixtures",
)
print(
    f"mean log p(z): uniform points {model.classifier.score_samples(uniform).mean():.1f}, "
    f"mixture samples {model.classifier.score_samples(mixture).mean():.1f}"
)

# %% [markdown]
# ## Per-class mixtures against one mixture for all
#
# Without labels, one mixture of ten components fitted to all codes can be scored as a clustering
# (cluster accuracy with the best matching of clusters to classes); with labels, one mixture per
# class is a classifier. The labels are worth this much:

# %%
best = summary["best"]
print(f"per-class mixtures, test accuracy:       {best['test_accuracy']:.3f}")
print(
    f"one mixture for all, cluster accuracy:   {best['test_single_mixture_cluster_accuracy']:.3f} "
    f"(NMI {best['test_single_mixture_nmi']:.3f})"
)
table = confusion_matrix(model.predict(x).cpu(), y.cpu(), k)
display(
    Image(
        filename=str(plots.plot_confusion(table, [str(c) for c in range(k)], OUT / "figures" / "confusion_again.png"))
    )
)

# %% [markdown]
# ## Novelty: "none of the classes"
#
# An image whose code has a log-density below the `novelty_quantile` of the training codes' scores
# is flagged as novel. Digits should rarely be; images of another kind (Fashion-MNIST clothes, or,
# where that dataset is not installed, inverted digits) should mostly be.

# %%
try:
    other = load_dataset("fashion-mnist").x[:1000]
    name = "Fashion-MNIST"
except DataError:
    other, name = 1 - x[:1000], "inverted digits"
rate_digits = model.is_novel(x).float().mean().item()
rate_other = model.is_novel(other.to(x.device)).float().mean().item()
plt.figure(figsize=(4.5, 3))
plt.bar(["MNIST test digits", name], [rate_digits, rate_other])
plt.ylabel("flagged novel")
plt.ylim(0, 1)
plt.title("novelty rate")
plt.show()
print(f"novel: {rate_digits:.3f} of the test digits, {rate_other:.3f} of the {name} images")
