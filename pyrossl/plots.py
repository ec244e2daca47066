"""Figures for runs and notebooks: image grids, learning curves, confusion matrices, latent PCA.

Figures are built as ``matplotlib.figure.Figure`` objects drawn by the Agg canvas, never through
``pyplot``: importing or calling this module neither changes a notebook's backend nor registers
figures with pyplot's figure manager, so nothing is left open. Every ``save``/``plot`` function
creates the parent folders of ``path``, writes a PNG and returns the path as a ``pathlib.Path``.

Images are ``[N, C, H, W]`` tensors or arrays with values in [0, 1] and ``C`` equal to 1 or 3,
the layout of :class:`pyrossl.data.dataset.Dataset`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pyrossl.evaluate import to_numpy
from pyrossl.files import atomic_write_bytes

ArrayLike = torch.Tensor | npt.ArrayLike
PathLike = str | os.PathLike

__all__ = [
    "image_grid",
    "plot_bands",
    "plot_confusion",
    "plot_curves",
    "plot_kl_per_unit",
    "plot_latent_pair",
    "plot_latent_pca",
    "plot_reconstructions",
    "save_image_grid",
]


def _images(images: ArrayLike, name: str = "images") -> np.ndarray:
    """``images`` as a float array ``[N, C, H, W]``; ``[N, H, W]`` is read as one channel."""
    a = to_numpy(images).astype(np.float64, copy=False)
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have shape [N, C, H, W] with C = 1 or 3 (or [N, H, W]), got {tuple(a.shape)}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} is empty: no images to draw")
    return a


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders created) and release its artists."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # atomically: a kill or a full disk never leaves a cut PNG, and a link planted at ``out`` is refused
    atomic_write_bytes(out, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    # The figure was never registered with pyplot; clearing drops its artists at once rather than
    # whenever the garbage collector gets to them.
    fig.clear()
    return out


def image_grid(images: ArrayLike, nrow: int, padding: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile images into one array, ``nrow`` images per row (as ``torchvision.utils.make_grid``).

    With ``N`` images of size ``H x W``, ``cols = min(nrow, N)`` and ``rows = ceil(N / cols)``, the
    grid has height ``rows * (H + padding) + padding`` and width ``cols * (W + padding) + padding``;
    image ``i`` has its top-left pixel at ``(padding + (i // cols) * (H + padding),
    padding + (i % cols) * (W + padding))``. Padding and empty cells hold ``pad_value``.
    Returns ``[H', W']`` for one channel, ``[H', W', 3]`` for three.
    """
    a = _images(images)
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    n, c, h, w = a.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value, dtype=a.dtype)
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[:, top : top + h, left : left + w] = a[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def _draw_grid(ax: Axes, grid: np.ndarray) -> None:
    grid = np.clip(grid, 0.0, 1.0)
    if grid.ndim == 2:
        ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")


def save_image_grid(
    images: ArrayLike,
    path: PathLike,
    nrow: int = 10,
    title: str | None = None,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Save :func:`image_grid` of ``images`` as a PNG, with ``row_labels[r]`` left of row ``r``.

    ``row_labels`` (for instance class names, one per row of a class-conditional sample grid) must
    have one entry per grid row, ``ceil(N / min(nrow, N))``.
    """
    a = _images(images)
    padding = 1
    grid = image_grid(a, nrow, padding=padding)
    n, _, h, _ = a.shape
    rows = math.ceil(n / min(nrow, n))
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"row_labels has {len(row_labels)} entries but the grid has {rows} rows")
    # half an inch per MNIST digit keeps 10 x 10 grids readable; smaller images (8 x 8 digits) get
    # half an inch each too, larger ones keep the MNIST scale
    inches_per_pixel = 0.5 / min(h, 28)
    height, width = grid.shape[:2]
    fig = _new_figure(max(2.0, width * inches_per_pixel), max(1.0, height * inches_per_pixel))
    ax = fig.add_subplot()
    _draw_grid(ax, grid)
    ax.set_xticks([])
    if row_labels is not None:
        ax.set_yticks([padding + r * (h + padding) + (h - 1) / 2 for r in range(rows)])
        ax.set_yticklabels([str(label) for label in row_labels])
        ax.tick_params(axis="y", length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    else:
        ax.axis("off")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite real scalar, otherwise ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def plot_curves(
    records: Sequence[Mapping[str, Any]],
    keys: Sequence[str] | str,
    path: PathLike,
    xkey: str = "epoch",
    title: str | None = None,
) -> Path:
    """Plot ``records[i][key]`` against ``records[i][xkey]``, one line per key in ``keys``.

    ``records`` are dicts such as the lines of ``metrics.jsonl``. A record without ``key``, or whose
    value is not a finite number (``None``, ``NaN``, a list), is skipped for that line only; a key
    found in no record gets no line. A record without ``xkey`` is placed at its position in
    ``records``. With no values at all the figure says so instead of failing.
    """
    if isinstance(keys, str):
        keys = [keys]
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    drawn = 0
    for key in keys:
        xs, ys = [], []
        for position, record in enumerate(records):
            y = _finite_number(record.get(key))
            if y is None:
                continue
            x = _finite_number(record.get(xkey, position))
            xs.append(position if x is None else x)
            ys.append(y)
        if ys:
            ax.plot(xs, ys, marker="o" if len(ys) < 30 else None, markersize=3, label=key)
            drawn += 1
    if drawn:
        ax.legend()
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, f"no values for {', '.join(keys)}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xkey)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_confusion(cm: ArrayLike, classes: Sequence[str] | None, path: PathLike, normalize: bool = True) -> Path:
    """Heat map of a confusion matrix (rows: true class, columns: predicted class).

    With ``normalize`` each row is divided by its total, ``cm[i, j] / sum_j cm[i, j]``, and cells
    show percentages (a row with no examples shows zeros); otherwise cells show the counts.
    ``classes`` names the rows and columns (indices when ``None``).
    """
    counts = to_numpy(cm)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"cm must be a square matrix, got shape {tuple(counts.shape)}")
    k = counts.shape[0]
    names = [str(i) for i in range(k)] if classes is None else [str(c) for c in classes]
    if len(names) != k:
        raise ValueError(f"classes has {len(names)} names but cm is {k} x {k}")
    counts = counts.astype(np.float64)
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        vmax = 1.0
    else:
        values = counts
        vmax = max(float(values.max()), 1.0)
    side = max(3.0, 0.5 * k + 1.5)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("fraction of the true class" if normalize else "examples")
    long_names = max(map(len, names)) > 3
    ax.set_xticks(range(k), names, rotation=45 if long_names else 0, ha="right" if long_names else "center")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fontsize = 8 if k <= 12 else 5
    for i in range(k):
        for j in range(k):
            text = f"{100 * values[i, j]:.0f}%" if normalize else f"{int(counts[i, j])}"
            colour = "white" if values[i, j] > 0.5 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize)
    ax.set_title("confusion matrix" + (" (row %)" if normalize else " (counts)"))
    return _save(fig, path)


def _pca_2d(z: np.ndarray) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Project ``z`` on its first two principal components; also their explained-variance ratios."""
    if z.shape[1] == 2:
        return z, None
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2)
    projected = pca.fit_transform(z)
    ratio = pca.explained_variance_ratio_
    return projected, (float(ratio[0]), float(ratio[1]))


def _tsne_2d(z: np.ndarray) -> np.ndarray:
    """A seeded 2-D t-SNE embedding of ``z`` (scikit-learn; PCA initialisation)."""
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(1.0, (z.shape[0] - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(z)


def plot_latent_pca(
    z: ArrayLike,
    labels: ArrayLike,
    path: PathLike | None,
    classes: Sequence[str] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    method: str = "pca",
) -> Path | None:
    """Scatter the latent codes ``z [N, D]`` on their first two principal components, by label.

    ``D > 2`` is reduced with PCA (scikit-learn), ``D == 2`` is drawn as it is; ``method="tsne"``
    draws a t-SNE embedding instead (any D >= 2; seeded). Points are coloured
    by ``labels [N]`` (integer classes), with a legend naming each class by ``classes[label]``.

    With ``ax`` the scatter goes on that axes (a caller's figure, for instance in a notebook); the
    figure is saved to ``path`` only when one is given, and is left open for its owner. Without
    ``ax`` a new figure is drawn and saved to ``path``, which is then required.
    """
    codes = to_numpy(z).astype(np.float64, copy=False)
    y = to_numpy(labels)
    if codes.ndim != 2 or codes.shape[1] < 2:
        raise ValueError(f"z must have shape [N, D] with D >= 2, got {tuple(codes.shape)}")
    if y.ndim != 1 or y.shape[0] != codes.shape[0]:
        raise ValueError(f"labels must have shape [N] matching z's N = {codes.shape[0]}, got {tuple(y.shape)}")
    if ax is None and path is None:
        raise ValueError("plot_latent_pca needs a path to save to when no ax is given")
    if method not in ("pca", "tsne"):
        raise ValueError(f"method must be 'pca' or 'tsne', not {method!r}")
    points, ratio = _pca_2d(codes) if method == "pca" else (_tsne_2d(codes), None)

    fig = None
    if ax is None:
        fig = _new_figure(5.5, 4.5)
        ax = fig.add_subplot()
    values = np.unique(y)
    cmap = colormaps["tab10" if values.size <= 10 else "tab20"]
    for index, value in enumerate(values):
        mask = y == value
        name = str(value)
        if classes is not None and 0 <= int(value) < len(classes):
            name = str(classes[int(value)])
        ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.7, color=cmap(index % cmap.N), label=name)
    ax.legend(markerscale=2, fontsize=7, loc="best")
    if method == "tsne":
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    elif ratio is None:
        ax.set_xlabel("z[0]")
        ax.set_ylabel("z[1]")
    else:
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}% of variance)")
    if title:
        ax.set_title(title)

    if fig is not None:
        return _save(fig, path)
    if path is None:
        return None
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, lambda f: ax.figure.savefig(f, format="png", bbox_inches="tight"))
    return out


def plot_latent_pair(
    z_left: ArrayLike,
    z_right: ArrayLike,
    labels: ArrayLike,
    path: PathLike,
    classes: Sequence[str] | None = None,
    titles: tuple[str, str] = ("before", "after"),
) -> Path:
    """Two latent spaces of the same points side by side, each on its own first two principal components."""
    fig = _new_figure(11, 4.5)
    for i, (z, title) in enumerate(zip((z_left, z_right), titles)):
        plot_latent_pca(z, labels, None, classes=classes, title=title, ax=fig.add_subplot(1, 2, i + 1))
    return _save(fig, path)


def plot_reconstructions(x: ArrayLike, x_rec: ArrayLike, path: PathLike, n: int = 10) -> Path:
    """Save the first ``n`` images of ``x`` in a top row and their reconstructions beneath.

    ``x_rec`` may be flat (``[N, C*H*W]``, as decoders often return it): it is reshaped to ``x``'s
    image shape when it holds the same number of values per image.
    """
    originals = _images(x, "x")
    rec = to_numpy(x_rec).astype(np.float64, copy=False)
    if rec.shape[0] != originals.shape[0]:
        raise ValueError(
            f"x and x_rec must hold the same number of images, got {originals.shape[0]} and {rec.shape[0]}"
        )
    if rec.shape[1:] != originals.shape[1:]:
        if rec[0].size != originals[0].size:
            raise ValueError(
                f"x_rec has shape {tuple(rec.shape)}, which does not fit x's images {tuple(originals.shape[1:])}"
            )
        rec = rec.reshape(originals.shape)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    n = min(n, originals.shape[0])
    both = np.concatenate([originals[:n], rec[:n]])
    return save_image_grid(both, path, nrow=n, row_labels=["original", "reconstruction"])


def plot_bands(
    curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    key: str,
    path: PathLike,
    xkey: str = "epoch",
    title: str | None = None,
) -> Path:
    """One line per label: the mean of ``key`` over its runs against ``xkey``, with a band of ± one sd.

    ``curves[label]`` is a list of runs, each a list of records (the lines of ``metrics.jsonl``). At
    each x the mean and the sample sd are taken over the runs that have a finite value there.
    """
    many = len(curves) > 6  # the legend goes beside the axes, where it hides no curve
    fig = _new_figure(9.5 if many else 6.5, 4.2)
    ax = fig.add_subplot()
    colours = colormaps["tab20" if len(curves) > 10 else "tab10"]
    drawn = 0
    for i, (label, run_records) in enumerate(curves.items()):
        by_x: dict[float, list[float]] = {}
        for records in run_records:
            for record in records:
                value, x = _finite_number(record.get(key)), _finite_number(record.get(xkey))
                if value is not None and x is not None:
                    by_x.setdefault(x, []).append(value)
        if not by_x:
            continue
        xs = np.array(sorted(by_x))
        mean = np.array([np.mean(by_x[x]) for x in xs])
        sd = np.array([np.std(by_x[x], ddof=1) if len(by_x[x]) > 1 else 0.0 for x in xs])
        colour = colours(i % colours.N)
        n = max(len(v) for v in by_x.values())
        ax.plot(xs, mean, color=colour, marker="o" if len(xs) < 30 else None, markersize=3, label=f"{label} (n={n})")
        ax.fill_between(xs, mean - sd, mean + sd, color=colour, alpha=0.2, linewidth=0)
        drawn += 1
    if drawn:
        ax.legend(fontsize=8, **({"loc": "center left", "bbox_to_anchor": (1.01, 0.5)} if many else {}))
    else:
        ax.text(0.5, 0.5, f"no values of {key}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xkey)
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{key}: mean ± sd over seeds")
    return _save(fig, path)


def plot_kl_per_unit(records: Sequence[Mapping[str, Any]], prefix: str, path: PathLike, xkey: str = "epoch") -> Path:
    """The KL of each latent unit over epochs (``<prefix>kl_per_unit``, one line per unit, units ordered by
    their last KL) beside the number of active units (``<prefix>active_units``), as vae_ssl's KL plots.

    A unit whose KL stays near zero carries no information about x (posterior collapse of that unit).
    """
    rows = [
        (r.get(xkey, i), r[prefix + "kl_per_unit"])
        for i, r in enumerate(records)
        if isinstance(r.get(prefix + "kl_per_unit"), list) and r[prefix + "kl_per_unit"]
    ]
    fig = _new_figure(11.0, 4.0)
    ax, ax_active = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if rows:
        xs = np.array([x for x, _ in rows], dtype=float)
        kl = np.array([k for _, k in rows], dtype=float)  # [epochs, units]
        order = np.argsort(-kl[-1])
        colours = colormaps["viridis"]
        for rank, u in enumerate(order):
            ax.plot(
                xs,
                kl[:, u],
                color=colours(rank / max(1, len(order) - 1)),
                linewidth=1,
                marker="o" if len(xs) < 30 else None,
                markersize=2,
            )
        ax.set_yscale("symlog", linthresh=0.01)
        ax.set_title(
            f"KL of each of the {kl.shape[1]} units, {'training' if prefix == 'train_' else 'validation'} images"
        )
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, f"no values of {prefix}kl_per_unit", ha="center", va="center", transform=ax.transAxes)
    active = [
        (x, v)
        for x, v in (
            (_finite_number(r.get(xkey, i)), _finite_number(r.get(prefix + "active_units")))
            for i, r in enumerate(records)
        )
        if x is not None and v is not None
    ]
    if active:
        ax_active.plot(*zip(*active), marker="o" if len(active) < 30 else None, markersize=3)
        ax_active.set_ylim(0, (len(rows[-1][1]) if rows else max(v for _, v in active)) + 0.5)
        ax_active.grid(alpha=0.3)
    ax_active.set_title("active units (Cov_x E_q[z_u] > 0.01)")
    for a in (ax, ax_active):
        a.set_xlabel(xkey)
    return _save(fig, path)
