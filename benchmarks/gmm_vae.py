"""Unsupervised classification of 3,000 MNIST digits (300 per class from mnist5k): the baselines.

    python benchmarks/gmm_vae.py                       # 3 seeds
    python benchmarks/gmm_vae.py --seeds 0 --out /tmp/gmm.json

Every method clusters the same 3,000 digits (the split of seed 0, ``limit_per_class = 300``) into
10 clusters, once per seed, and is scored against the true classes: cluster accuracy with the optimal
(Hungarian) matching and with Serket's greedy label swap, NMI and ARI (mean ± sd over seeds), and
seconds. Methods:

- ``kmeans-pixels``: scikit-learn's k-means on the 784 pixels (10 initialisations);
- ``gmm-pca18-sklearn``: scikit-learn's GaussianMixture (full covariances, 5 restarts) on 18 PCA components;
- ``gmm-pca18-pyro``: the same mixture as a Pyro model fitted by EM
  (:class:`pyrossl.mixture.PyroGaussianMixture`), which must score at least as well: its mean
  log-likelihood on the codes is reported next to scikit-learn's.
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

ROOT = Path(__file__).resolve().parents[1]
METHODS = "kmeans-pixels,gmm-pca18-sklearn,gmm-pca18-pyro"
N_INIT = 5  # EM restarts of both mixtures: the one with the highest likelihood is kept


def digits_3000(dataset: str = "mnist5k", per_class: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """The flat pixels and labels of ``per_class`` digits of each class (the seed-0 subset)."""
    data = load_dataset(dataset)
    split = make_split(data, labels_per_class=0, validation=0, test=0, seed=0, limit_per_class=per_class)
    index = split.unlabelled.sort().values
    return data.x[index].flatten(1).numpy().astype(np.float64), data.y[index].numpy()


def pca_codes(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(dim, random_state=seed).fit_transform(x)


def run_method(method: str, x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, dict]:
    """Cluster labels of every row of ``x``, and extra numbers to report."""
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
    lines = ["| method | cluster accuracy (Hungarian) | greedy (Serket) | NMI | ARI | mean log-lik. | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cell = lambda key: f"{r[key]:.3f} ± {r[key + '_sd']:.3f}" if key in r else "—"  # noqa: E731
        ll = f"{r['mean_log_likelihood']:.3f}" if "mean_log_likelihood" in r else "—"
        lines.append(f"| {r['method']} | {cell('cluster_accuracy')} | {cell('greedy_cluster_accuracy')} | "
                     f"{cell('nmi')} | {cell('ari')} | {ll} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--dataset", default="mnist5k", help="where the digits come from (digits: for tests)")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gmm-vae.json")
    args = parser.parse_args(argv)
    x, y = digits_3000(args.dataset, args.per_class)
    k = int(y.max()) + 1
    rows = []
    for method in args.methods.split(","):
        per_seed = []
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            clusters, extra = run_method(method, x, k, seed)
            seconds = time.perf_counter() - start
            per_seed.append({"seed": seed, "seconds": seconds, **clustering_metrics(clusters, y), **extra})
        row = {"method": method, "points": len(y), "per_seed": per_seed}
        for key in per_seed[0]:
            if key != "seed":
                row[key], row[key + "_sd"] = mean_sd([r[key] for r in per_seed])
        rows.append(row)
    print(table(rows))
    result = {"rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
