"""The in-memory dataset every model of the zoo reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def choose_attributes(source: str, requested, default, known) -> list[str]:
    """The attribute names a multi-label source reads: ``requested`` (``None``: ``default``), each one of ``known``.

    Raises:
        ConfigError: an empty list, or a name not in ``known`` (suggesting the closest one).
    """
    from pyrossl.config import suggest
    from pyrossl.errors import ConfigError

    chosen = list(default if requested is None else requested)
    if not chosen:
        raise ConfigError(f"{source}: attributes must name at least one attribute")
    for name in chosen:
        if name not in known:
            raise ConfigError(f"{source}: unknown attribute '{name}'{suggest(name, list(known))}")
    return chosen


@dataclass
class Dataset:
    """Images as one float tensor in [0, 1], their labels, and what a model needs to know about them.

    ``x`` has shape ``[N, C, H, W]``. ``y`` is ``int64 [N]`` (one categorical label, ``classes`` names
    them) or ``float32 [N, A]`` with values in {0, 1} (binary attributes, ``attributes`` names them).
    ``test_index`` holds the indices of the source's official test part, when it has one; splits then
    use it as the test set instead of holding one out.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    test_index: torch.Tensor | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    @property
    def num_features(self) -> int:
        return int(self.x[0].numel())

    @property
    def multilabel(self) -> bool:
        return self.y.dim() == 2

    @property
    def num_classes(self) -> int:
        """Number of classes, or of attributes for a multi-label dataset."""
        return len(self.attributes) if self.multilabel else len(self.classes)

    def __len__(self) -> int:
        return self.x.shape[0]

    def meta(self) -> dict:
        """What a model or guide may know about the data: never the data itself."""
        return {
            "name": self.name,
            "image_shape": self.image_shape,
            "num_features": self.num_features,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "attributes": self.attributes,
            "multilabel": self.multilabel,
            "num_examples": len(self),
        }


@dataclass
class Split:
    """Disjoint index tensors (``int64``) into a :class:`Dataset`'s ``x`` and ``y``."""

    labelled: torch.Tensor
    unlabelled: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor

    def sizes(self) -> dict:
        return {k: int(getattr(self, k).numel()) for k in ("labelled", "unlabelled", "validation", "test")}
