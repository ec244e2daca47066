"""What the training loop draws from: the dataset on its device (:class:`TrainingData`) and the batch
schedule of an epoch (:class:`BatchSchedule`).

An epoch is a list of steps, each a pair of index tensors (unlabelled batch, labelled batch), either
of which may be None. An entry that ignores labels trains on every training image (the labelled ones
included, their labels unseen); an entry that uses labels takes a labelled batch with every
``train.labelled_every``-th unlabelled batch, cycling the (usually small) labelled part, reshuffled
at each pass. Every order is drawn from the one data generator, so a resumed epoch redraws it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pyrossl.data.dataset import Dataset, Split
from pyrossl.data.splits import batch_indices, binarize
from pyrossl.errors import ConfigError

Step = tuple[torch.Tensor | None, torch.Tensor | None]


@dataclass
class TrainingData:
    """The dataset's images and labels on the training device, and the split's index tensors.

    With ``binarize`` each batch is drawn afresh from Bernoulli(pixel) (:meth:`inputs`); the held-out
    images are binarised once, from the seed (:meth:`on_device`), so every epoch scores the same images.
    """

    x: torch.Tensor
    y: torch.Tensor
    split: Split
    binarize: bool

    @classmethod
    def on_device(
        cls, dataset: Dataset, split: Split, binarized: bool, seed: int, device: torch.device
    ) -> TrainingData:
        x = dataset.x
        if binarized:
            held_out = torch.cat([split.validation, split.test])
            x = x.clone()
            x[held_out] = binarize(x[held_out], torch.Generator().manual_seed(seed))
        return cls(x.to(device), dataset.y.to(device), split, binarized)

    def part(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of one part of the split (``validation``, ``test``, ...)."""
        index = getattr(self.split, name).to(self.x.device)
        return self.x[index], self.y[index]

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`part`, or for ``train`` :meth:`training_set` (as :meth:`pyrossl.run.Run.tensors`)."""
        return self.training_set() if part == "train" else self.part(part)

    def inputs(self, index: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The images (binarised afresh when asked) and labels of a batch of dataset rows."""
        if index is None:
            return None, None
        index = index.to(self.x.device)
        x = self.x[index]
        if self.binarize:
            x = binarize(x)
        return x, self.y[index]

    def training_index(self) -> torch.Tensor:
        return torch.cat([self.split.unlabelled, self.split.labelled]).to(self.x.device)

    def training_tensors(self) -> dict:
        """Every training image (``x``, rows ``index``), and the labelled ones with their labels
        (``x_labelled``, ``y_labelled``): the labels of unlabelled images never leave here."""
        labelled = self.split.labelled.to(self.x.device)
        train = self.training_index()
        return {"x": self.x[train], "index": train, "x_labelled": self.x[labelled], "y_labelled": self.y[labelled]}

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every training image with its true label: for scoring an entry that evaluates on its training points."""
        train = self.training_index()
        return self.x[train], self.y[train]


class BatchSchedule:
    """The steps of each epoch for one entry and one split (see the module's docstring)."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        labelled_batch_size: int | None,
        labelled_every: int,
        uses_labels: bool,
        uses_unlabelled: bool,
        model: str,
    ):
        self.split, self.batch_size = split, batch_size
        self.labelled_batch_size, self.labelled_every = labelled_batch_size or batch_size, labelled_every
        self.uses_labels, self.uses_unlabelled, self.model = uses_labels, uses_unlabelled, model

    def epoch(self, generator: torch.Generator) -> list[Step]:
        """One epoch's (unlabelled, labelled) index pairs, drawn from ``generator``."""
        split = self.split
        if not self.uses_labels:
            train = torch.cat([split.unlabelled, split.labelled]).sort().values
            return [(b, None) for b in batch_indices(train, self.batch_size, generator)]
        unlabelled = batch_indices(split.unlabelled, self.batch_size, generator) if self.uses_unlabelled else []
        labelled = batch_indices(split.labelled, self.labelled_batch_size, generator)
        if not unlabelled:
            if not labelled:
                raise ConfigError(
                    f"model '{self.model}' needs labelled examples: set data.labels_per_class or data.label_fraction"
                )
            return [(None, b) for b in labelled]
        if not labelled:
            return [(b, None) for b in unlabelled]
        every = self.labelled_every  # a labelled batch joins steps 0, every, 2 * every, ...
        wanted = math.ceil(len(unlabelled) / every)
        while len(labelled) < wanted:
            labelled += batch_indices(split.labelled, self.labelled_batch_size, generator)
        return [(b, labelled[i // every] if i % every == 0 else None) for i, b in enumerate(unlabelled)]

    def first_steps(self, generator: torch.Generator) -> list[Step]:
        """The first step of each kind, with and without a labelled batch, without moving ``generator``."""
        state = generator.get_state()
        try:
            steps = self.epoch(generator)
        finally:
            generator.set_state(state)
        kinds: dict[bool, Step] = {}
        for unlab, lab in steps:
            kinds.setdefault(lab is None, (unlab, lab))
        return list(kinds.values())
