"""Scoring an entry on the parts of its split, during training and at its end.

After an evaluated epoch :meth:`Scorer.parts` gives the entry's metrics on the validation and test parts
(and on the training images for an entry that scores them), prefixed ``val_``, ``test_``, ``train_``;
at the end :meth:`Scorer.final` adds the IWAE estimate of log p(x) on the test part (``train.iwae_samples``).
With several processes each one scores its share of a part and the entry's sums are added up
(:meth:`pyrossl.zoo.ZooModel.evaluation_counts`): the numbers of a single process.

Every score is computed on a random stream of its own (:func:`separate_randomness`), seeded from the
run's seed and what is scored, so how often and how much is evaluated never changes what is trained.
"""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import pyro
import torch

from pyrossl import distributed
from pyrossl.data.training import TrainingData


@contextlib.contextmanager
def separate_randomness(words: list[int], device: torch.device):
    """Run the block on a random stream of its own, seeded from ``words``, and give the caller's
    streams (torch's, the CUDA device's, numpy's and Python's: every one Pyro draws from) back as
    they were, so an evaluation's noise depends on what it evaluates, not on what ran before."""
    saved = {"random": random.getstate(), "numpy": np.random.get_state()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pyro.set_rng_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))
        try:
            yield
        finally:
            random.setstate(saved["random"])
            np.random.set_state(saved["numpy"])


class Scorer:
    """The metrics of ``model`` on ``data``'s parts (see the module's docstring)."""

    PREFIX = {"train": "train_", "validation": "val_", "test": "test_"}

    def __init__(
        self, model, data: TrainingData, dist, device: torch.device, seed: int, batch_size: int, iwae_samples: int = 0
    ):
        self.model, self.data, self.dist, self.device = model, data, dist, device
        self.seed, self.batch_size, self.iwae_samples = seed, batch_size, iwae_samples

    def parts(self, parts=("validation", "test"), stream: int = 0, code: bool = True) -> dict:
        """Metrics of the held-out parts (and of the training set for entries that score it), on every
        process; ``stream`` (the epoch) seeds the evaluation's own noise; ``code``: the code's KL per unit
        and active units too, on the first part. An entry without counts is scored by rank 0 alone and
        its metrics sent to the others."""
        with separate_randomness([self.seed, stream, self.dist.rank, 0x5EA1], self.device):
            if self.dist.active and not self.model.splits_evaluation():
                return distributed.broadcast_object(
                    self._parts(parts, split=False, code=code) if distributed.is_writer() else None
                )
            return self._parts(parts, split=self.dist.active, code=code)

    def _parts(self, parts, split: bool, code: bool) -> dict:
        self.model.eval()
        metrics = {}
        if self.model.evaluate_on_train:
            parts = ("train", *parts)
        for part in parts:
            x, y = self.data.training_set() if part == "train" else self.data.part(part)
            if not x.shape[0]:
                continue
            if split:
                x, y = distributed.shard(x), distributed.shard(y)
                counts = distributed.sum_counts(
                    self.model.evaluation_counts(x, y, self.batch_size) if x.shape[0] else None
                )
                values = self.model.metrics_from_counts(counts)
            else:
                values = self.model.evaluate(x, y, self.batch_size)
            if code and part == parts[0] and self.model.z_guides:
                # the code's use per unit, on the first part (validation, or the scored training set)
                sums = self.model.code_counts(x, self.batch_size) if x.shape[0] else None
                values.update(self.model.code_metrics(distributed.sum_counts(sums) if split else sums))
            metrics.update({self.PREFIX[part] + k: v for k, v in values.items()})
        return metrics

    def final(self, stream: int) -> dict:
        """:meth:`parts`, and with ``iwae_samples`` = k > 0 the IWAE log p(x) of the test part (Burda et al.
        2016), the guide's own ELBO there and the gap between them (from below, the guide's mean KL to
        the posterior: what a guide ablation compares)."""
        metrics = self.parts(stream=stream)
        k = self.iwae_samples
        if not k:
            return metrics
        x = distributed.shard(self.data.part("test")[0])  # this process's share of the test set
        try:
            with separate_randomness([self.seed, stream, self.dist.rank, 0x1EAE], self.device):
                ll = self.model.log_likelihood(x, k) if x.shape[0] else torch.zeros(0)
                elbo = self.model.elbo_estimate(x) if x.shape[0] else torch.zeros(0)
        except NotImplementedError:
            ll = elbo = None
        if distributed.all_true(ll is not None):
            total, total_elbo, count = distributed.sum_over_processes(
                [ll.double().sum().item(), elbo.double().sum().item(), ll.numel()]
            )
            metrics["test_log_likelihood"] = total / count if count else math.nan
            metrics["test_guide_elbo"] = total_elbo / count if count else math.nan
            metrics["test_iwae_gap"] = metrics["test_log_likelihood"] - metrics["test_guide_elbo"]
            metrics["iwae_samples"] = k
        return metrics
