# %% [markdown]
# # Your own guide
#
# The zoo's entries are Pyro model/guide pairs: a model names its sample sites, a guide provides
# them, and `entry.elbo` trains the pair. This tutorial adds two guides of M2 from a file outside the
# package, without touching the zoo's code: a $q(z \mid x)$ that ignores the label, and a label guide
# that smooths $q(y \mid x)$. It trains one from the command line in a fresh process, ablates both
# against the zoo's `enum` / `diag-normal` with `pyrossl ablate` (accuracy beside the held-out ELBO,
# the IWAE bound and their gap), loads a run back, and finally trains a zoo entry with plain
# `pyro.infer.SVI`. `PYROSSL_QUICK=1` uses small settings.

# %%
import ast
import csv
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pyro
import torch
from IPython.display import Image, Markdown, display
from pyro.infer import SVI
from pyro.optim import ClippedAdam

import pyrossl
from pyrossl.config import load_config
from pyrossl.guides.label import LABEL_GUIDES
from pyrossl.registry import build_model
from pyrossl.runs import load_dataset_for

MODE = os.environ.get("PYROSSL_QUICK", "")  # "1": quick; "smoke": the test suite's, every cell on the least work
QUICK, SMOKE = MODE in ("1", "smoke"), MODE == "smoke"
ROOT = Path(pyrossl.__file__).resolve().parents[1]
OUT = Path(os.environ.get("PYROSSL_TUTORIALS", "outputs/tutorials")).resolve() / (
    "own-guide-" + MODE if QUICK else "own-guide"
)
PLUGIN = ROOT / "notebooks/plugins/m2_guides.py"


def pyrossl_command(*args):
    """``pyrossl ARGS`` in a fresh process, as from a shell; its output printed."""
    done = subprocess.run([sys.executable, "-m", "pyrossl", *map(str, args)], capture_output=True, text=True)
    print(done.stdout[-3000:] + done.stderr[-3000:])
    assert done.returncode == 0, done.returncode


# %% [markdown]
# ## What a label guide of M2 provides
#
# M2's guides are a family, `pyrossl.guides.label.LABEL_GUIDES`. It declares what a member must
# have, and refuses a class that lacks any of it when it is registered, in one line naming what is
# missing. Subclassing `LabelGuide` (or one of its members) gives everything; you override what
# differs.

# %%
for name, what in LABEL_GUIDES.requires.items():
    print(f"{name:12s} {what}")

# %% [markdown]
# ## The two guides, in a file of their own
#
# `qzx` keeps the enumerated $q(y \mid x)$ and replaces $q(z \mid x, y)$ by $q(z \mid x)$: with the
# label summed out, $z$ is drawn once for all classes, and M2's decoder broadcasts the ten classes
# against it. `smoothed-enum` keeps the encoder and mixes $q(y \mid x)$ with the uniform law,
# $(1 - \epsilon)\,\mathrm{softmax}(\ell(x)) + \epsilon / K$, which keeps every class in the sum.

# %%
source = PLUGIN.read_text()
classes = {
    n.name: n.end_lineno - n.lineno + 1 + len(n.decorator_list)
    for n in ast.parse(source).body
    if isinstance(n, ast.ClassDef)
}
print(
    f"lines: q(z|x) guide {classes['XOnlyEncoder'] + classes['QzxGuide']} (XOnlyEncoder + QzxGuide), "
    f"label guide {classes['SmoothedEnumGuide']} (SmoothedEnumGuide)"
)
display(Markdown(f"```python\n{source}```"))

# %% [markdown]
# ## Train it from the command line
#
# `--plugin` imports the file before the recipe is read; the run records it in `config.toml` (by its
# absolute path), so `eval`, `report`, `train --resume` and `load_run` find it again in any process.

# %%
epochs = "1" if SMOKE else "2" if QUICK else "30"
IWAE = "10" if SMOKE else "100"  # samples of the IWAE bound (smoke: a tenth, the same code)
run_dir = OUT / "qzx"
if not (run_dir / "summary.json").exists():
    pyrossl_command(
        "train",
        ROOT / "runs/demo.toml",
        "--set",
        "guide=qzx",
        "--set",
        f"train.epochs={epochs}",
        "--set",
        f"train.iwae_samples={IWAE}",
        *(
            ["--set", "data.limit_per_class=150", "--set", "data.validation=200", "--set", "data.test=300"]
            if SMOKE
            else []
        ),
        "--plugin",
        PLUGIN,
        "--out",
        run_dir,
        "--quiet",
    )
print([line for line in (run_dir / "config.toml").read_text().splitlines() if line.startswith("plugins")])
pyrossl_command("eval", run_dir)

# %% [markdown]
# ## Ablate them against the zoo's guides
#
# `pyrossl ablate` trains every guide with every seed. Beside the task metric its table reports, on
# the test images, the guide's own ELBO, the IWAE bound with 100 samples (`test_log_likelihood`) and
# their gap, an estimate from below of how far the guide is from the posterior: two guides of equal
# accuracy can approximate the posterior quite differently.

# %%
ablation = OUT / "ablation"
seeds = "0" if QUICK else "0,1,2"
pyrossl_command(
    "ablate",
    ROOT / "runs/m2-digits.toml",
    "--guides",
    "enum,qzx,smoothed-enum",
    "--z-guides",
    "diag-normal",
    "--seeds",
    seeds,
    "--iwae",
    IWAE,
    "--plugin",
    PLUGIN,
    "--out",
    ablation,
    *(["--set", f"train.epochs={1 if SMOKE else 3}"] if QUICK else []),
)
display(Image(filename=str(ablation / "ablation.png")))

# %%
rows = list(csv.DictReader((ablation / "ablation.csv").open()))
variants = list(dict.fromkeys(r["variant"] for r in rows))
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
for ax, key, title in zip(
    axes,
    ["test_accuracy", "test_guide_elbo", "test_iwae_gap"],
    ["test accuracy", "guide's ELBO (nats)", f"IWAE({IWAE}) - ELBO (nats)"],
):
    for i, v in enumerate(variants):
        values = [float(r[key]) for r in rows if r["variant"] == v]
        ax.scatter([i] * len(values), values, color=f"C{i}")
        ax.bar(i, sum(values) / len(values), color=f"C{i}", alpha=0.3)
    ax.set_xticks(range(len(variants)), [v.split(",")[0].removeprefix("guide=") for v in variants])
    ax.set_title(title)
    if key != "test_accuracy":
        lo = min(float(r[key]) for r in rows)
        hi = max(float(r[key]) for r in rows)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Load it back
#
# This kernel never imported the plugin: `load_run` reads it from the run's `config.toml`.

# %%
run = pyrossl.load_run(run_dir)
print(type(run.model.guide).__name__, "from", type(run.model.guide).__module__)
x, y = run.tensors("test")
print(
    f"test accuracy {(run.predict(x).cpu() == y.cpu()).float().mean():.3f}; "
    f"guide's ELBO {run.summary['best']['test_guide_elbo']:.2f}, IWAE({IWAE}) "
    f"{run.summary['best']['test_log_likelihood']:.2f} nats"
)
display(Image(filename=str(run_dir / "figures" / "class_samples.png")))

# %% [markdown]
# ## The same pair with Pyro alone
#
# `entry.model`, `entry.guide` and `entry.elbo` are a Pyro model, guide and ELBO: `pyro.infer.SVI`
# with Pyro's own optimiser trains them (the callables register their modules with `pyro.module`
# when Pyro keeps its parameters in the param store, its default). Its loss on a batch is the
# trainer's on the same batch and seed.

# %%
config = load_config(ROOT / "runs/m2-digits.toml", ["options.hidden=[64]", "options.z_dim=8"])
dataset = load_dataset_for(config)
entry = build_model(config, dataset.meta())
labelled = torch.arange(0, 1500, 30)  # 50 labelled digits, the rest unlabelled

pyro.set_rng_seed(0)
trainer_loss = entry(dataset.x[:100]).item() * 100
pyro.set_rng_seed(0)
print(
    f"one batch: the trainer's loss {trainer_loss:.3f}, SVI's "
    f"{SVI(entry.model, entry.guide, ClippedAdam({'lr': 0.0}), entry.elbo).evaluate_loss(dataset.x[:100]):.3f}"
)

pyro.clear_param_store()
svi = SVI(entry.model, entry.guide, ClippedAdam({"lr": 3e-3}), entry.elbo)
losses = []
for _ in range(30 if SMOKE else 100 if QUICK else 1500):
    batch = torch.randint(0, 1500, (100,))
    losses.append(svi.step(dataset.x[batch]) / 100 + svi.step(dataset.x[labelled], dataset.y[labelled]) / len(labelled))
test = torch.arange(1500, len(dataset.x))
accuracy = (entry.predict(dataset.x[test]) == dataset.y[test]).float().mean()
print(f"{len(pyro.get_param_store())} parameters in Pyro's param store; test accuracy after SVI {accuracy:.3f}")
plt.figure(figsize=(6, 3))
plt.plot(losses)
plt.yscale("log")
plt.xlabel("SVI step")
plt.ylabel("loss per image (nats)")
plt.title("M2 trained by pyro.infer.SVI alone")
plt.show()
