"""Independent judges: classifiers trained on real images, used to label what a generative model draws.

A judge answers "which class (or which attribute values) does this image show?" without knowing the
model that made it, so that interventions can be scored: set a CCVAE's z_c to class k's prior mean,
decode, and count how often the judge says k (:meth:`pyrossl.models.ccvae.CCVAE.intervention_accuracy`).

- :class:`LogisticJudge`: logistic regression on the pixels (scikit-learn); one per attribute for
  multi-label data. Enough for centred objects such as Fashion-MNIST.
- :class:`ConvJudge`: a small convolutional network (PyTorch), for properties a linear map of the
  pixels cannot read, such as the shape of an object anywhere in the image.

Both are fitted with :func:`fit_judge` and called as ``judge.predict(x)`` on images ``[N, C, H, W]``: class
indices ``int64 [N]``, or attribute values ``int64 [N, A]``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pyrossl.errors import ConfigError

KINDS = ("logistic", "conv")


class LogisticJudge:
    """Logistic regression on flattened pixels; ``multilabel``: one binary regression per attribute."""

    def __init__(self, multilabel: bool, max_iter: int = 500, C: float = 1.0):
        self.multilabel, self.max_iter, self.C = multilabel, max_iter, C
        self.models: list = []

    def fit(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> LogisticJudge:
        from sklearn.linear_model import LogisticRegression

        features = x.flatten(1).cpu().numpy()
        targets = y.cpu().numpy()
        columns = [targets[:, i] for i in range(targets.shape[1])] if self.multilabel else [targets]
        self.models = [
            LogisticRegression(max_iter=self.max_iter, C=self.C, random_state=seed).fit(features, t.astype(np.int64))
            for t in columns
        ]
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        features = x.flatten(1).cpu().numpy()
        predictions = [torch.from_numpy(m.predict(features).astype(np.int64)) for m in self.models]
        return torch.stack(predictions, 1) if self.multilabel else predictions[0]


class ConvJudge(nn.Module):
    """Two strided convolutions, a third whose features are max-pooled over the image (is a corner
    anywhere?), and a linear read-out."""

    def __init__(self, channels: int, outputs: int, multilabel: bool, width: int = 32):
        super().__init__()
        self.multilabel = multilabel
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, outputs),
        )

    def fit(
        self, x: torch.Tensor, y: torch.Tensor, seed: int = 0, epochs: int = 5, batch_size: int = 128, lr: float = 2e-3
    ) -> ConvJudge:
        generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.Adam(self.parameters(), lr=lr)
        loss_fn = nn.BCEWithLogitsLoss() if self.multilabel else nn.CrossEntropyLoss()
        self.train()
        for _ in range(epochs):
            for index in torch.randperm(x.shape[0], generator=generator).split(batch_size):
                xb, yb = x[index], y[index]
                loss = loss_fn(self.net(xb), yb.float() if self.multilabel else yb.long())
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        self.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        device = next(self.parameters()).device
        logits = torch.cat([self.net(xb.to(device)).cpu() for xb in x.split(batch_size)])
        return (logits > 0).long() if self.multilabel else logits.argmax(-1)


def fit_judge(x: torch.Tensor, y: torch.Tensor, kind: str = "logistic", seed: int = 0, **options):
    """A judge of ``kind`` (:data:`KINDS`) fitted on real images ``x`` and their labels ``y``.

    ``y``: class indices ``[N]`` or attribute values ``[N, A]`` in {0, 1}. ``options`` go to the
    judge's ``fit`` (``ConvJudge``: epochs, batch_size, lr) or constructor (``LogisticJudge``: max_iter, C).
    """
    multilabel = y.dim() == 2
    if kind == "logistic":
        return LogisticJudge(multilabel, **options).fit(x, y, seed=seed)
    if kind == "conv":
        outputs = y.shape[1] if multilabel else int(y.max()) + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            judge = ConvJudge(x.shape[1], outputs, multilabel).to(x.device)
        return judge.fit(x, y, seed=seed, **options)
    raise ConfigError(f"unknown judge '{kind}'; known: {', '.join(KINDS)}")


def judge_accuracy(judge, x: torch.Tensor, y: torch.Tensor) -> float:
    """The judge's own accuracy on real labelled images (mean over attributes for multi-label data)."""
    return (judge.predict(x) == y.long().cpu()).float().mean().item()
