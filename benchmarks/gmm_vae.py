"""Unsupervised classification of 3,000 MNIST digits (300 per class from mnist5k): GMM-prior VAEs and baselines.

    python benchmarks/gmm_vae.py                       # every method, 3 seeds
    python benchmarks/gmm_vae.py --methods serket,serket-plain --seeds 0 --out /tmp/gmm.json

Every method clusters the same 3,000 digits (the split of seed 0, ``limit_per_class = 300``) into
10 clusters, once per seed, and is scored against the true classes: cluster accuracy with the optimal
(Hungarian) matching and with Serket's greedy label swap, NMI and ARI (mean ± sd over seeds), and
seconds. Methods:

- ``kmeans-pixels``: scikit-learn's k-means on the 784 pixels (10 initialisations);
- ``gmm-pca18-sklearn``: scikit-learn's GaussianMixture (full covariances, 10 restarts) on 18 PCA components;
- ``gmm-pca18-pyro``: the same mixture as a Pyro model fitted by EM
  (:class:`pyrossl.mixture.PyroGaussianMixture`, 10 restarts), which must score at least as well: its mean
  log-likelihood on the codes is reported next to scikit-learn's;
- ``serket``: Serket mode (``runs/serket-vae-gmm-mnist3000.toml``, zoo entry ``serket-vae-gmm``) trained
  by the zoo's trainer; seconds are the whole schedule (5 rounds x 200 epochs, GMM updates and one
  evaluation per round);
- ``serket-plain``: the same schedule as a hand-written PyTorch loop (same network, initialisation,
  loss, optimiser, batches and GMM updates): the time the zoo's version is measured against;
- ``gmm-vae``: the end-to-end mixture-prior VAE (``runs/gmm-vae-mnist3000.toml``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pyrossl.data import load_dataset, make_split
from pyrossl.evaluate import clustering_metrics, mean_sd
from pyrossl.train import tune_allocator

ROOT = Path(__file__).resolve().parents[1]
METHODS = "kmeans-pixels,gmm-pca18-sklearn,gmm-pca18-pyro,serket-plain,serket,gmm-vae"
N_INIT = 10  # EM restarts of both mixtures: the one with the highest likelihood is kept
RECIPES = {"serket": ROOT / "runs/serket-vae-gmm-mnist3000.toml", "gmm-vae": ROOT / "runs/gmm-vae-mnist3000.toml"}


def digits_3000(dataset: str = "mnist5k", per_class: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """The flat pixels and labels of ``per_class`` digits of each class (the seed-0 subset)."""
    data = load_dataset(dataset)
    split = make_split(data, labels_per_class=0, validation=0, test=0, seed=0, limit_per_class=per_class)
    index = split.unlabelled.sort().values
    return data.x[index].flatten(1).numpy().astype(np.float64), data.y[index].numpy()


def pca_codes(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(dim, random_state=seed).fit_transform(x)


def serket_plain(x: np.ndarray, seed: int, config, image_shape) -> tuple[np.ndarray, dict]:
    """Serket mode as a plain PyTorch loop: the recipe's schedule without Pyro or the zoo's trainer.

    Same encoder/decoder modules and initialisation, Bernoulli cross-entropy + alpha * analytic KL to
    N(mu_k, I), Adam, the recipe's batches, and the same Pyro GMM update after every round.
    """
    from pyrossl.data import batch_indices
    from pyrossl.mixture import PyroGaussianMixture
    from pyrossl.models.serket_vae_gmm import SerketVAEGMM

    torch.manual_seed(seed)
    o, t = SerketVAEGMM.make_options(config.options), config.train
    images = torch.from_numpy(x).float()
    entry = SerketVAEGMM({"image_shape": image_shape, "num_classes": 10, "num_examples": len(x)}, o)
    encoder, decoder = entry.guide, entry.decoder  # the networks only: no Pyro below
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=t.lr)
    prior = torch.zeros(len(x), o.z_dim)
    g = torch.Generator().manual_seed(seed)
    rounds, clusters = t.epochs // o.epochs_per_round, None
    for r in range(rounds):
        for _ in range(o.epochs_per_round):
            for b in batch_indices(torch.arange(len(x)), t.batch_size, g):
                xb = images[b]
                loc, scale = encoder.encode(xb)
                z = loc + scale * torch.randn_like(loc)
                rec = torch.nn.functional.binary_cross_entropy_with_logits(decoder(z), xb, reduction="sum")
                kl = torch.distributions.kl_divergence(
                    torch.distributions.Normal(loc, scale), torch.distributions.Normal(prior[b], 1.0)
                ).sum()
                loss = (rec + o.alpha * kl) / len(b)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            loc, scale = encoder.encode(images)
            codes = loc + scale * torch.randn_like(loc) if o.message == "sample" else loc
            gmm = PyroGaussianMixture(
                o.clusters, o.z_dim, reg_covar=o.reg_covar, n_init=o.n_init, seed=r, covariance_type=o.covariance
            ).fit(codes)
            clusters = gmm.predict(codes)
            prior = gmm.means[clusters]
    return clusters.numpy(), {}


def zoo_run(method: str, seed: int, runs_dir: Path, overrides: list[str]) -> tuple[np.ndarray, dict]:
    """Train (or read) the recipe's run for ``seed``; clusters of the training points and the run's seconds."""
    from pyrossl.config import load_config
    from pyrossl.run import load_run
    from pyrossl.train import train_to_completion

    config = load_config(str(RECIPES[method]), [*overrides, f"seed={seed}", "train.progress=false"])
    out = runs_dir / f"{method}-seed{seed}"
    summary = train_to_completion(config, out)
    run = load_run(out, which="last")
    x, _ = run.tensors("train")
    order = torch.cat([run.split.unlabelled, run.split.labelled]).argsort()  # dataset order, as digits_3000
    return run.model.cluster(x[order]).cpu().numpy(), {"seconds": summary["seconds"]}


def run_method(
    method: str,
    x: np.ndarray,
    k: int,
    seed: int,
    runs_dir: Path | None = None,
    overrides: list[str] = (),
    image_shape=(1, 28, 28),
) -> tuple[np.ndarray, dict]:
    """Cluster labels of every row of ``x``, and extra numbers to report."""
    if method == "serket-plain":
        from pyrossl.config import load_config

        return serket_plain(x, seed, load_config(str(RECIPES["serket"]), list(overrides)), image_shape)
    if method in RECIPES:
        return zoo_run(method, seed, runs_dir, list(overrides))
    if method == "kmeans-pixels":
        from sklearn.cluster import KMeans

        return KMeans(k, n_init=10, random_state=seed).fit_predict(x), {}
    z = pca_codes(x, 18, seed)
    if method == "gmm-pca18-sklearn":
        from sklearn.mixture import GaussianMixture

        gm = GaussianMixture(k, covariance_type="full", reg_covar=1e-6, n_init=N_INIT, random_state=seed).fit(z)
        return gm.predict(z), {"mean_log_likelihood": float(gm.score(z))}
    if method == "gmm-pca18-pyro":
        from pyrossl.mixture import PyroGaussianMixture

        zt = torch.from_numpy(z)
        gmm = PyroGaussianMixture(k, z.shape[1], reg_covar=1e-6, n_init=N_INIT, seed=seed).double().fit(zt)
        return gmm.predict(zt).numpy(), {"mean_log_likelihood": gmm.log_likelihood(zt) / z.shape[0]}
    raise SystemExit(f"unknown method {method!r} (known: {METHODS})")


def table(rows: list[dict]) -> str:
    lines = [
        "| method | cluster accuracy (Hungarian) | greedy (Serket) | NMI | ARI | mean log-lik. | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cell = lambda key, r=r: f"{r[key]:.3f} ± {r[key + '_sd']:.3f}" if key in r else "—"  # noqa: E731
        ll = f"{r['mean_log_likelihood']:.3f}" if "mean_log_likelihood" in r else "—"
        lines.append(
            f"| {r['method']} | {cell('cluster_accuracy')} | {cell('greedy_cluster_accuracy')} | "
            f"{cell('nmi')} | {cell('ari')} | {ll} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--dataset", default="mnist5k", help="where the digits come from (digits: for tests)")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gmm-vae.json")
    parser.add_argument(
        "--runs", type=Path, default=ROOT / "outputs/bench-gmm-vae", help="run directories of the zoo's methods"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides for the VAE methods"
    )
    parser.add_argument(
        "--set-serket", action="append", default=[], metavar="KEY=VALUE", help="for serket and serket-plain only"
    )
    parser.add_argument("--set-gmm-vae", action="append", default=[], metavar="KEY=VALUE", help="for gmm-vae only")
    args = parser.parse_args(argv)
    x, y = digits_3000(args.dataset, args.per_class)
    image_shape = tuple(load_dataset(args.dataset).image_shape)
    overrides = [f"data.name={args.dataset}", f"data.limit_per_class={args.per_class}", *args.set]
    k = int(y.max()) + 1
    rows = []
    for method in args.methods.split(","):
        per_seed = []
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            own = args.set_gmm_vae if method == "gmm-vae" else args.set_serket if method.startswith("serket") else []
            clusters, extra = run_method(method, x, k, seed, args.runs, overrides + own, image_shape)
            extra.setdefault("seconds", time.perf_counter() - start)
            per_seed.append({"seed": seed, **clustering_metrics(clusters, y), **extra})
        row = {"method": method, "points": len(y), "per_seed": per_seed}
        for key in per_seed[0]:
            if key != "seed":
                row[key], row[key + "_sd"] = mean_sd([r[key] for r in per_seed])
        rows.append(row)
    print(table(rows))
    result = {"rows": rows}
    seconds = {r["method"]: r["seconds"] for r in rows}
    if "serket" in seconds and "serket-plain" in seconds:
        result["serket_over_plain"] = seconds["serket"] / seconds["serket-plain"]
        print(
            f"\nSerket schedule: zoo {seconds['serket']:.1f} s, plain PyTorch {seconds['serket-plain']:.1f} s "
            f"(ratio {result['serket_over_plain']:.2f})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    tune_allocator()  # as `pyrossl train` does: this process only trains
    main()
