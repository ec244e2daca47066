"""What an entry wants drawn, as data: the entries say *what* to show, :mod:`pyrossl.report` draws it.

An entry's ``figures(x, y, outputs)`` returns a list of :class:`Figure`: a file name, a kind and the
arrays to draw. Nothing here imports matplotlib, the run folder or the trainer, so a model module
stays a generative story and its guide (``import pyrossl.models.m2`` loads no plotting library); the
report layer maps each kind to its drawing function in :mod:`pyrossl.plots` and writes the PNG
atomically into the run's ``figures/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: kind -> the function of :mod:`pyrossl.plots` that draws it (called with ``path=`` and the figure's arguments)
KINDS = {
    "images": "save_image_grid",  # images [N, C, H, W], nrow, title, row_labels
    "reconstructions": "plot_reconstructions",  # x, x_rec: originals above their reconstructions
    "confusion": "plot_confusion",  # cm [K, K] (rows: true class), classes
    "latent": "plot_latent_pca",  # z [N, D], labels [N], classes, title, method ("pca" | "tsne")
    "latent_pair": "plot_latent_pair",  # z_left, z_right, labels, classes, titles
}


@dataclass(frozen=True)
class Figure:
    """One figure of a run: drawn by the report layer into ``figures/<name>.png``."""

    name: str
    kind: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"figure kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"a figure's name is a plain file stem, not {self.name!r}")

    @classmethod
    def images(
        cls, name: str, images, nrow: int = 10, title: str | None = None, row_labels: Sequence[str] | None = None
    ) -> Figure:
        return cls(
            name,
            "images",
            {
                "images": _cpu(images),
                "nrow": nrow,
                "title": title,
                "row_labels": None if row_labels is None else [str(r) for r in row_labels],
            },
        )

    @classmethod
    def reconstructions(cls, name: str, x, x_rec) -> Figure:
        return cls(name, "reconstructions", {"x": _cpu(x), "x_rec": _cpu(x_rec)})

    @classmethod
    def confusion(cls, name: str, cm, classes: Sequence[str] | None) -> Figure:
        return cls(
            name, "confusion", {"cm": _cpu(cm), "classes": None if classes is None else [str(c) for c in classes]}
        )

    @classmethod
    def latent(
        cls, name: str, z, labels, classes: Sequence[str] | None = None, title: str | None = None, method: str = "pca"
    ) -> Figure:
        return cls(
            name,
            "latent",
            {
                "z": _cpu(z),
                "labels": _cpu(labels),
                "title": title,
                "method": method,
                "classes": None if classes is None else [str(c) for c in classes],
            },
        )

    @classmethod
    def latent_pair(
        cls,
        name: str,
        z_left,
        z_right,
        labels,
        classes: Sequence[str] | None = None,
        titles: tuple[str, str] = ("before", "after"),
    ) -> Figure:
        return cls(
            name,
            "latent_pair",
            {
                "z_left": _cpu(z_left),
                "z_right": _cpu(z_right),
                "labels": _cpu(labels),
                "titles": tuple(titles),
                "classes": None if classes is None else [str(c) for c in classes],
            },
        )


def _cpu(value):
    """Tensors leave the device (a figure outlives the batch it came from); arrays pass as they are."""
    return value.detach().cpu() if hasattr(value, "detach") else value
