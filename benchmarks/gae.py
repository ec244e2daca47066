"""Gaussian Auto Embeddings benchmark: accuracy, the label-free single mixture, and novelty.

    python benchmarks/gae.py                    # Fashion-MNIST and mnist5k, 3 seeds each
    python benchmarks/gae.py --seeds 0 --set train.epochs=2 --out /tmp/gae.json

For each recipe and seed it trains the autoencoder and its per-class mixtures (resuming runs already
in ``--runs``) and reports the test accuracy (mean ± sd over seeds) next to the published figures
(0.8538 on Fashion-MNIST, 0.9766 on full MNIST), the cluster accuracy of one mixture fitted without
labels, and the novelty rates: the fraction of the model's own test images it rejects, and the
fraction of images from the other dataset (MNIST digits fed to the Fashion-MNIST model, and the other
way round) it rejects. It also trains a VAE with the same network on the first recipe's data and
draws the interpolation between pairs of test images through both models (``--figure``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pyrossl import plots
from pyrossl.config import config_from_dict, load_config
from pyrossl.data import load_dataset
from pyrossl.evaluate import mean_sd
from pyrossl.models.gae import class_pairs, latent_interpolation
from pyrossl.run import load_run
from pyrossl.train import train_to_completion, tune_allocator

PUBLISHED = {"fashion-mnist": 0.8538, "mnist5k": 0.9766}  # the post; its MNIST figure is on full MNIST
OTHER = {"fashion-mnist": "mnist5k", "mnist5k": "fashion-mnist"}
ROOT = Path(__file__).resolve().parents[1]


def run_one(recipe: str, overrides: list[str], out: Path) -> dict:
    """Train (or finish, or just read) one run directory; returns its summary."""
    return train_to_completion(load_config(recipe, overrides + ["train.progress=false"]), out)


def other_images(name: str, shape, limit: int = 5000) -> torch.Tensor | None:
    """Images of the other dataset, when it exists here and has the same image shape."""
    try:
        data = load_dataset(name)
    except Exception:  # noqa: BLE001 (not installed here: the column stays empty)
        return None
    if tuple(data.x.shape[1:]) != tuple(shape):
        return None
    return data.x[:limit]


def benchmark_recipe(recipe: str, seeds: list[int], overrides: list[str], runs_dir: Path) -> tuple[dict, list[Path]]:
    per_seed, dirs = [], []
    for seed in seeds:
        out = runs_dir / f"{Path(recipe).stem}-seed{seed}"
        summary = run_one(recipe, overrides + [f"seed={seed}"], out)
        run = load_run(out)
        best = summary["best"]
        record = {
            "seed": seed,
            "test_accuracy": best["test_accuracy"],
            "single_mixture_cluster_accuracy": best.get("test_single_mixture_cluster_accuracy"),
            "novelty_rate_test": best["test_novelty_rate"],
            "seconds": summary["seconds"],
        }
        other = other_images(OTHER.get(run.config.data.name, ""), run.dataset.x.shape[1:])
        if other is not None:
            record["novelty_rate_other"] = run.model.is_novel(other).double().mean().item()
        per_seed.append(record)
        dirs.append(out)
    config = load_config(recipe, overrides)
    row = {
        "recipe": Path(recipe).name,
        "dataset": config.data.name,
        "seeds": seeds,
        "per_seed": per_seed,
        "published_accuracy": PUBLISHED.get(config.data.name),
    }
    for key in (
        "test_accuracy",
        "single_mixture_cluster_accuracy",
        "novelty_rate_test",
        "novelty_rate_other",
        "seconds",
    ):
        values = [r[key] for r in per_seed if r.get(key) is not None]
        if values:
            row[key], row[key + "_sd"] = mean_sd(values)
    return row, dirs


def train_contrast_vae(gae_run, epochs: int, out: Path):
    """A VAE with the GAE's network and data, for the interpolation contrast."""
    c = gae_run.config
    o = c.options
    raw = {
        "model": "vae",
        "seed": c.seed,
        "data": {k: v for k, v in vars(c.data).items() if v is not None},
        "train": {
            "epochs": epochs,
            "batch_size": c.train.batch_size,
            "lr": c.train.lr,
            "progress": False,
            "iwae_samples": 0,
        },
        "options": {"z_dim": o["z_dim"], "hidden": o["hidden"], "act": o["act"], "net": o["net"]},
    }
    train_to_completion(config_from_dict(raw), out)
    return load_run(out)


def interpolation_figure(gae_run, vae_run, path: Path) -> Path:
    x, y = gae_run.tensors("test")
    k = gae_run.model.meta["num_classes"]
    classes = [str(c) for c in gae_run.model.meta["classes"]] or [str(c) for c in range(k)]
    rows, labels = [], []
    for i, j in class_pairs(y, k, count=4):
        for name, run in (("AE", gae_run), ("VAE", vae_run)):
            rows.append(latent_interpolation(run.model, x[i : i + 1], x[j : j + 1]))
            labels.append(f"{name} {classes[int(y[i])]}→{classes[int(y[j])]}")
    return plots.save_image_grid(
        torch.cat(rows).cpu(),
        path,
        nrow=10,
        row_labels=labels,
        title="straight line between two test images' codes: autoencoder vs VAE",
    )


def table(rows: list[dict]) -> str:
    def fmt(row, key):
        return f"{row[key]:.4f} ± {row[key + '_sd']:.4f}" if key in row else "—"

    lines = [
        "| data | test accuracy | published | single mixture, no labels (cluster acc.) | rejected: own test | "
        "rejected: other data | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        published = f"{r['published_accuracy']:.4f}" if r.get("published_accuracy") else "—"
        lines.append(
            f"| {r['dataset']} ({len(r['seeds'])} seeds) | {fmt(r, 'test_accuracy')} | {published} | "
            f"{fmt(r, 'single_mixture_cluster_accuracy')} | {fmt(r, 'novelty_rate_test')} | "
            f"{fmt(r, 'novelty_rate_other')} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=f"{ROOT}/runs/gae-fmnist.toml,{ROOT}/runs/gae-mnist5k.toml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every recipe")
    parser.add_argument("--runs", type=Path, default=Path("outputs/bench-gae"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gae.json")
    parser.add_argument("--vae-epochs", type=int, default=10, help="epochs of the contrast VAE (0: no figure)")
    parser.add_argument("--figure", type=Path, default=ROOT / "benchmarks/results/gae-interpolation.png")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, first_dirs = [], []
    for recipe in args.recipes.split(","):
        row, dirs = benchmark_recipe(recipe, seeds, args.set, args.runs)
        rows.append(row)
        first_dirs.append(dirs[0])
    result = {"rows": rows}
    if args.vae_epochs:
        gae_run = load_run(first_dirs[0])
        vae_run = train_contrast_vae(gae_run, args.vae_epochs, args.runs / f"contrast-vae-{gae_run.config.data.name}")
        result["figure"] = str(interpolation_figure(gae_run, vae_run, args.figure))
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    tune_allocator()  # as `pyrossl train` does: this process only trains
    main()
