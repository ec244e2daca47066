"""Metrics for classifiers, clusterings and likelihood estimates.

Every function takes torch tensors or numpy arrays and returns plain Python numbers, lists or
numpy arrays, so results go straight into ``metrics.jsonl`` (``iwae_log_likelihood`` is the one
exception: it stays in torch, next to the model code that produces its input). Label arrays are
1-D integer arrays of equal length; a mismatch raises ``ValueError`` naming both shapes.

Clustering metrics compare a clustering with the true classes without knowing which cluster
stands for which class: ``cluster_accuracy`` uses the optimal one-to-one matching (Hungarian
algorithm), ``greedy_cluster_accuracy`` the label-swap search of the Serket framework (Nakamura et
al. 2018), which papers built on Serket report and which can stop short of the optimum.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

ArrayLike = torch.Tensor | npt.ArrayLike

__all__ = [
    "accuracy",
    "ari",
    "attribute_accuracy",
    "classification_metrics",
    "cluster_accuracy",
    "cluster_mapping",
    "clustering_metrics",
    "confusion_matrix",
    "greedy_cluster_accuracy",
    "iwae_log_likelihood",
    "label_table",
    "mean_sd",
    "nmi",
    "pairs_from_table",
    "per_class_accuracy",
    "per_image",
    "reconstruction_bce_sum",
    "to_numpy",
]


def to_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view (or copy) of a tensor, array or nested sequence."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(x: ArrayLike, name: str) -> np.ndarray:
    """``x`` as a 1-D int64 array; floats are accepted only when they hold whole numbers."""
    a = to_numpy(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {tuple(a.shape)}")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{name} must hold integer labels, got non-integer values")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer labels, got dtype {a.dtype}")
    return a.astype(np.int64)


def _label_pair(a: ArrayLike, b: ArrayLike, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Two label arrays of the same, non-zero length."""
    x, y = _labels(a, names[0]), _labels(b, names[1])
    if x.shape != y.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same length, got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.size == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty: no examples to score")
    return x, y


def _check_range(a: np.ndarray, num_classes: int, name: str) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if a.min() < 0 or a.max() >= num_classes:
        raise ValueError(
            f"{name} must lie in [0, {num_classes - 1}] for num_classes={num_classes}, "
            f"got values from {a.min()} to {a.max()}"
        )


def accuracy(pred: ArrayLike, target: ArrayLike) -> float:
    """Fraction of examples whose predicted label equals the true one: ``mean(pred == target)``."""
    p, t = _label_pair(pred, target, ("pred", "target"))
    return float(np.mean(p == t))


def per_class_accuracy(pred: ArrayLike, target: ArrayLike, num_classes: int) -> list[float]:
    """Recall of each class: for class ``k``, ``#{pred == k and target == k} / #{target == k}``.

    A class absent from ``target`` gets ``float('nan')`` (``json.dumps`` writes it as ``NaN``).
    """
    cm = confusion_matrix(pred, target, num_classes)
    support = cm.sum(axis=1)
    return [float(cm[k, k] / support[k]) if support[k] else math.nan for k in range(num_classes)]


def confusion_matrix(pred: ArrayLike, target: ArrayLike, num_classes: int) -> np.ndarray:
    """Counts ``cm[i, j] = #{target == i and pred == j}``: rows are true classes, columns predictions.

    Returns an ``int64`` array of shape ``[num_classes, num_classes]``.
    """
    p, t = _label_pair(pred, target, ("pred", "target"))
    _check_range(p, num_classes, "pred")
    _check_range(t, num_classes, "target")
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def cluster_mapping(clusters: ArrayLike, target: ArrayLike, num_classes: int | None = None) -> dict[int, int]:
    """The one-to-one matching of clusters to classes that maximises the number of agreements.

    With the contingency table ``n[c, k] = #{clusters == c and target == k}`` over the clusters that
    occur and the classes ``0 .. num_classes - 1`` (default ``max(target) + 1``), it returns the
    injective map ``m`` maximising ``sum_c n[c, m(c)]``, found with the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment``). Cluster ids may be any integers.

    When there are more clusters than classes, only ``num_classes`` clusters are matched; the others
    are left out of the returned dict, and their examples count as wrong in ``cluster_accuracy``
    (no two clusters share a class). When there are fewer clusters, some classes stay unmatched.
    """
    c, t = _label_pair(clusters, target, ("clusters", "target"))
    cluster_values, _, rows, cols = _hungarian(c, t, num_classes)
    return {int(cluster_values[r]): int(k) for r, k in zip(rows, cols)}


def _hungarian(
    c: np.ndarray, t: np.ndarray, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cluster ids, contingency table, and the matched (row, class) pairs maximising agreements."""
    if num_classes is None:
        num_classes = int(t.max()) + 1
    _check_range(t, num_classes, "target")
    cluster_values, cluster_index = np.unique(c, return_inverse=True)
    table = np.zeros((cluster_values.size, num_classes), dtype=np.int64)
    np.add.at(table, (cluster_index, t), 1)
    from scipy.optimize import linear_sum_assignment  # imported when used: scipy and scikit-learn add ~0.7 s

    rows, cols = linear_sum_assignment(table, maximize=True)
    return cluster_values, table, rows, cols


def cluster_accuracy(clusters: ArrayLike, target: ArrayLike) -> float:
    """Accuracy of the clustering under its best one-to-one cluster-to-class matching.

    ``max_m mean(m(clusters) == target)`` over injective maps ``m`` (see :func:`cluster_mapping`);
    examples in clusters left unmatched count as wrong. Invariant to renaming the clusters.
    """
    c, t = _label_pair(clusters, target, ("clusters", "target"))
    _, table, rows, cols = _hungarian(c, t, None)
    return float(table[rows, cols].sum() / c.size)


def greedy_cluster_accuracy(clusters: ArrayLike, target: ArrayLike) -> float:
    """Accuracy under the greedy label-swap matching of the Serket framework (``calc_acc``).

    Cluster ``c`` first carries label ``c`` (identity mapping). Sweeps go over all pairs of labels
    ``(i, j)``; whenever exchanging labels ``i`` and ``j`` between the clusters that carry them
    strictly raises the accuracy, the exchange is kept at once. Sweeps repeat until one changes
    nothing. The result is a local optimum with respect to single swaps, so it is at most
    :func:`cluster_accuracy` and can be lower: a clustering whose best matching is a 3-cycle of
    labels, with every single swap worse than the identity, is never improved.

    The labels swapped are the distinct values of ``clusters`` and ``target`` together; Serket uses
    ``0 .. max(clusters)``, the same set whenever clusters and classes together use each of those
    values and no other.
    """
    c, t = _label_pair(clusters, target, ("clusters", "target"))
    labels = np.union1d(c, t)
    ci, ti = np.searchsorted(labels, c), np.searchsorted(labels, t)
    size = labels.size
    table = np.zeros((size, size), dtype=np.int64)
    np.add.at(table, (ci, ti), 1)

    # cluster_with[l]: the cluster now carrying label l. The gain of a swap needs only the four
    # table cells it touches. Ordered pairs, as in Serket, so the same local optimum is reached.
    cluster_with = np.arange(size)
    correct = int(np.trace(table))
    changed = True
    while changed:
        changed = False
        for i in range(size):
            for j in range(size):
                a, b = cluster_with[i], cluster_with[j]
                gain = table[a, j] + table[b, i] - table[a, i] - table[b, j]
                if gain > 0:
                    cluster_with[i], cluster_with[j] = b, a
                    correct += int(gain)
                    changed = True
    return correct / c.size


def nmi(clusters: ArrayLike, target: ArrayLike) -> float:
    """Normalised mutual information ``I(C; Y) / ((H(C) + H(Y)) / 2)`` (scikit-learn's default)."""
    c, t = _label_pair(clusters, target, ("clusters", "target"))
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(t, c))


def ari(clusters: ArrayLike, target: ArrayLike) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985): pair agreement corrected for chance, 1 when equal."""
    c, t = _label_pair(clusters, target, ("clusters", "target"))
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(t, c))


def attribute_accuracy(pred: ArrayLike, target: ArrayLike, threshold: float = 0.5) -> tuple[float, list[float]]:
    """Accuracy of each binary attribute and their mean, for multi-label predictions.

    ``pred`` holds probabilities or 0/1 values of shape ``[N, A]``; an attribute is predicted
    present when ``pred > threshold`` (so a probability of exactly 0.5 reads as absent, as with
    ``torch.round``). ``target`` holds 0/1 values of the same shape. Returns
    ``(mean_a acc_a, [acc_1, ..., acc_A])`` with ``acc_a = mean_n(pred_na == target_na)``.
    """
    p, t = to_numpy(pred), to_numpy(target)
    if p.ndim != 2:
        raise ValueError(f"pred must have shape [N, A], got {tuple(p.shape)}")
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"pred and target are empty (shape {tuple(p.shape)}): nothing to score")
    if not np.all((t == 0) | (t == 1)):
        raise ValueError("target must hold only 0 and 1")
    per_attribute = np.mean((p > threshold) == (t == 1), axis=0)
    return float(per_attribute.mean()), [float(a) for a in per_attribute]


def classification_metrics(pred: ArrayLike, target: ArrayLike, num_classes: int, prefix: str = "") -> dict[str, Any]:
    """``{prefix + "accuracy": float, prefix + "per_class_accuracy": list[float]}``."""
    return {
        f"{prefix}accuracy": accuracy(pred, target),
        f"{prefix}per_class_accuracy": per_class_accuracy(pred, target, num_classes),
    }


def clustering_metrics(clusters: ArrayLike, target: ArrayLike, prefix: str = "") -> dict[str, float]:
    """Cluster accuracy (Hungarian and greedy), NMI and ARI, with keys prefixed by ``prefix``."""
    return {
        f"{prefix}cluster_accuracy": cluster_accuracy(clusters, target),
        f"{prefix}greedy_cluster_accuracy": greedy_cluster_accuracy(clusters, target),
        f"{prefix}nmi": nmi(clusters, target),
        f"{prefix}ari": ari(clusters, target),
    }


def label_table(pred: ArrayLike, target: ArrayLike, num_pred: int, num_classes: int) -> torch.Tensor:
    """Counts ``table[p, k] = #{pred == p and target == k}`` as an int64 tensor ``[num_pred, num_classes]``.

    The table is all a classification or clustering metric needs, and tables of disjoint parts of a
    set add up to the table of the whole: what processes that evaluate one share each sum (see
    :meth:`pyrossl.zoo.ZooModel.evaluation_counts`). :func:`pairs_from_table` gives labels back.
    """
    p = torch.as_tensor(to_numpy(pred)).long().flatten().cpu()
    t = torch.as_tensor(to_numpy(target)).long().flatten().cpu()
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same length, got shapes {tuple(p.shape)} and {tuple(t.shape)}")
    for a, n, name in ((p, num_pred, "pred"), (t, num_classes, "target")):
        if a.numel() and (a.min() < 0 or a.max() >= n):
            raise ValueError(f"{name} labels must lie in 0..{n - 1}, got values in {int(a.min())}..{int(a.max())}")
    return torch.bincount(p * num_classes + t, minlength=num_pred * num_classes).reshape(num_pred, num_classes)


def pairs_from_table(table: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, target)`` label arrays holding each pair ``(p, k)`` ``table[p, k]`` times.

    Every metric of this module that compares two labellings depends on their pairs only, not on
    the order of the examples, so it gives the same value on these arrays as on the originals.
    """
    t = to_numpy(table).astype(np.int64)
    p, k = np.nonzero(t)
    counts = t[p, k]
    return np.repeat(p, counts), np.repeat(k, counts)


def iwae_log_likelihood(log_weights: ArrayLike) -> torch.Tensor:
    """The importance-weighted estimate of ``log p(x)`` per example (Burda et al. 2016).

    ``log_weights[k, n] = log p(x_n, z_k) - log q(z_k | x_n)`` for ``K`` samples ``z_k ~ q(z | x_n)``.
    Returns a tensor of shape ``[N]``::

        L_K(x_n) = log (1/K) sum_k exp(w_kn) = logsumexp_k(w_kn) - log K

    computed with ``logsumexp``, so weights far below zero (``-1e4``) do not underflow. In
    expectation ``L_K`` is a lower bound of ``log p(x)`` that tightens as ``K`` grows
    (``L_1`` is the ELBO, ``L_K -> log p(x)`` as ``K -> inf``); by Jensen's inequality each
    estimate is at least the mean of its weights.
    """
    w = torch.as_tensor(log_weights)
    if not torch.is_floating_point(w):
        w = w.to(torch.get_default_dtype())
    if w.dim() != 2:
        raise ValueError(f"log_weights must have shape [K, N], got {tuple(w.shape)}")
    if w.shape[0] == 0:
        raise ValueError("log_weights has K = 0 samples: need at least one per example")
    return torch.logsumexp(w, dim=0) - math.log(w.shape[0])


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of a metric over runs (seeds); the sd of one run is 0."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_sd needs at least one value")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def reconstruction_bce_sum(decode, z: torch.Tensor, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The Bernoulli cross-entropy of the images ``x`` under ``decode(z)`` (pixel probabilities), in nats
    summed over the images (a float64 scalar, for :meth:`pyrossl.zoo.ZooModel.evaluation_counts`)."""
    total = sum(
        torch.nn.functional.binary_cross_entropy(decode(zb), xb, reduction="sum").item()
        for zb, xb in zip(torch.split(z, batch_size), torch.split(x, batch_size))
    )
    return torch.tensor(total, dtype=torch.float64)


def per_image(counts: dict[str, torch.Tensor], *keys: str) -> dict[str, float]:
    """Sums of ``counts`` divided by its number of images ``counts["count"]``."""
    n = float(counts["count"])
    return {k: float(counts[k]) / n for k in keys}
