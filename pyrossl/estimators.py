"""scikit-learn estimators over the zoo's entries that classify or cluster.

scikit-learn's semi-supervised convention (``sklearn.semi_supervised``): ``fit(X, y)`` with ``y = -1``
for the unlabelled rows. :class:`ZooClassifier` trains ``m2``, ``m1m2``, ``adgm``, ``sdgm``, ``ccvae``, ``gae``
or ``classifier`` (which reads the labelled rows only) through the zoo's own trainer, on the arrays
themselves (the run's dataset is ``"arrays"``; a run directory is optional, ``run_dir``); :class:`ZooClusterer` trains
``gmm-vae`` without labels. Both have ``predict``, ``predict_proba``, ``transform`` (the posterior
means of the code, where the entry has one) and ``score``, and take part in a ``Pipeline`` or a
``GridSearchCV``: their parameters are the recipe's common keys, with ``options`` (the entry's
``[options]``) and ``settings`` (any other recipe key, dotted: ``{"train.lr_schedule": "cosine"}``).

The entries' likelihoods are over pixels in [0, 1]: ``X`` is scaled into [0, 1] by its smallest and
largest value in ``fit`` (left as it is when already inside; ``scale=None`` refuses other values),
the same affine map applies in ``predict``, clipped to [0, 1]. ``X`` is ``[N, D]`` (features, read as
a 1 x 1 x D image: dense networks only) or images ``[N, H, W]`` / ``[N, C, H, W]``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, ClusterMixin, TransformerMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pyrossl.errors import ConfigError

#: the entries each estimator trains
CLASSIFYING = ("m2", "m1m2", "adgm", "sdgm", "ccvae", "gae", "classifier")
CLUSTERING = ("gmm-vae",)
#: the label of an unlabelled row in ``fit(X, y)`` (scikit-learn's semi-supervised convention)
UNLABELLED = -1


class _ZooEstimator(TransformerMixin, BaseEstimator):
    """What both estimators share: the recipe their parameters make, the scaling of X, the training."""

    _entries: tuple[str, ...] = ()

    def _config(self, extra_options: dict | None = None):
        from pyrossl.config import config_from_dict
        from pyrossl.data.sources import ARRAYS

        if self.model not in self._entries:
            raise ConfigError(f"{type(self).__name__} trains {', '.join(self._entries)}, not model '{self.model}'")
        raw = {
            "model": self.model,
            "guide": self.guide,
            "z_guide": self.z_guide,
            "seed": self.seed,
            "device": self.device,
            "threads": self.threads,
            "data": {"name": ARRAYS, "labels_per_class": None, "validation": 0, "test": 0},
            "train": {
                "epochs": self.epochs,
                "batch_size": self.batch_size,
                "lr": self.lr,
                "progress": False,
                "figures": False,
                "iwae_samples": 0,
            },
            "options": {**(self.options or {}), **(extra_options or {})},
        }
        for key, value in (self.settings or {}).items():
            section, _, name = key.rpartition(".")
            (raw.setdefault(section, {}) if section else raw)[name] = value
        return config_from_dict({k: v for k, v in raw.items() if v is not None or k in ("guide", "z_guide")})

    def _scale_fit(self, X: np.ndarray) -> np.ndarray:
        low, high = float(X.min()), float(X.max())
        if low >= 0 and high <= 1:
            self.scale_ = (0.0, 1.0)
        elif self.scale is None:
            raise ValueError(f"X must lie in [0, 1] with scale=None (it spans [{low:g}, {high:g}])")
        else:
            self.scale_ = (low, high - low if high > low else 1.0)
        return self._scaled(X)

    def _scaled(self, X: np.ndarray) -> np.ndarray:
        low, width = self.scale_
        return np.clip((X - low) / width, 0.0, 1.0)

    def _images(self, X: np.ndarray) -> torch.Tensor:
        shape = self.image_shape_
        return torch.as_tensor(self._scaled(X).reshape(len(X), *shape), dtype=torch.float32)

    def _check_X(self, X, reset: bool, y=None, supervised: bool = False):
        if reset and supervised:  # y None: scikit-learn's own "requires y to be passed" error
            X, y = validate_data(self, X, y, dtype=np.float64, allow_nd=True, ensure_min_samples=2)
        elif reset:
            X = validate_data(self, X, dtype=np.float64, allow_nd=True, ensure_min_samples=2)
        else:
            X = validate_data(self, X, reset=False, dtype=np.float64, allow_nd=True)
        if X.ndim == 2:
            shape = (1, 1, X.shape[1])
        elif X.ndim == 3:
            shape = (1, *X.shape[1:])
        elif X.ndim == 4:
            shape = tuple(X.shape[1:])
        else:
            raise ValueError(f"X must be [N, D], [N, H, W] or [N, C, H, W], not of {X.ndim} dimensions")
        if reset:
            self.image_shape_ = shape
        return X.reshape(len(X), -1), y

    def _train(self, X: np.ndarray, y_codes: np.ndarray, labelled: np.ndarray, classes, extra_options=None):
        from pyrossl.data.dataset import Dataset, Split
        from pyrossl.data.sources import ARRAYS
        from pyrossl.train import Trainer

        config = self._config(extra_options)
        x = torch.as_tensor(self._scale_fit(X).reshape(len(X), *self.image_shape_), dtype=torch.float32)
        dataset = Dataset(name=ARRAYS, x=x, y=torch.as_tensor(y_codes, dtype=torch.long), classes=classes)
        index = torch.arange(len(X))
        mask = torch.as_tensor(labelled)
        empty = index[:0]
        split = Split(labelled=index[mask], unlabelled=index[~mask], validation=empty, test=empty)
        with tempfile.TemporaryDirectory(prefix="pyrossl-fit-") as scratch:
            out = Path(self.run_dir) if self.run_dir is not None else Path(scratch) / "run"
            trainer = Trainer(config, out, data=(dataset, split))
            self.summary_ = trainer.fit()
        self.model_ = trainer.model.cpu().eval()
        return self

    @torch.no_grad()
    def transform(self, X) -> np.ndarray:
        """The posterior mean of the entry's code z for each row (``[N, z_dim]``); for the supervised-only
        ``classifier``, which has no code, its class log-probabilities log q(y|x) (``[N, n_classes]``)."""
        check_is_fitted(self)
        X, _ = self._check_X(X, reset=False)
        x = self._images(X)
        try:
            return self.model_.latent(x).double().numpy()
        except NotImplementedError:
            return torch.log_softmax(self.model_.class_logits(x).double(), -1).numpy()


class ZooClassifier(ClassifierMixin, _ZooEstimator):
    """A zoo entry that classifies (``m2``, ``m1m2``, ``adgm``, ``sdgm``, ``ccvae``, ``gae``, ``classifier``) as a
    scikit-learn classifier; ``fit(X, y)`` with ``y = -1`` for unlabelled rows (semi-supervised entries learn
    from them too)."""

    _entries = CLASSIFYING

    def __init__(
        self,
        model: str = "m2",
        guide: str | None = None,
        z_guide: str | None = None,
        epochs: int = 20,
        batch_size: int = 100,
        lr: float = 1e-3,
        options: dict | None = None,
        settings: dict | None = None,
        scale: str | None = "minmax",
        seed: int = 0,
        device: str = "cpu",
        threads: int | None = None,
        run_dir: str | None = None,
    ):
        self.model, self.guide, self.z_guide = model, guide, z_guide
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.options, self.settings, self.scale = options, settings, scale
        self.seed, self.device, self.threads, self.run_dir = seed, device, threads, run_dir

    def fit(self, X, y):
        X, y = self._check_X(X, reset=True, y=y, supervised=True)
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            import warnings

            from sklearn.exceptions import DataConversionWarning

            warnings.warn("y should be a 1d array; it was ravelled", DataConversionWarning, stacklevel=2)
            y = y.ravel()
        check_classification_targets(y)
        labelled = ~((y == UNLABELLED) if np.issubdtype(y.dtype, np.number) else np.zeros(len(y), bool))
        self.classes_, codes = np.unique(y[labelled], return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"the labelled rows hold {len(self.classes_)} class; a classifier needs at least 2")
        y_codes = np.zeros(len(y), dtype=np.int64)
        y_codes[labelled] = codes
        return self._train(X, y_codes, labelled, tuple(str(c) for c in self.classes_))

    @torch.no_grad()
    def predict_proba(self, X) -> np.ndarray:
        """q(y|x) (the entry's classifier) for each row, ``[N, n_classes]`` in the order of ``classes_``."""
        check_is_fitted(self)
        X, _ = self._check_X(X, reset=False)
        return self.model_.posterior(self._images(X))["y_probs"].double().numpy()

    def predict(self, X) -> np.ndarray:
        probs = self.predict_proba(X)  # first: an unfitted estimator says so
        return self.classes_[probs.argmax(1)]


class ZooClusterer(ClusterMixin, _ZooEstimator):
    """``gmm-vae`` (a VAE with a Gaussian-mixture prior, the cluster enumerated) as a scikit-learn clusterer:
    ``fit(X)`` without labels, ``labels_``, ``predict`` (the most probable cluster p(c|z) at the code's
    posterior mean), ``predict_proba``, ``transform``; ``score`` is the mean ELBO per row (nats)."""

    _entries = CLUSTERING

    def __init__(
        self,
        n_clusters: int = 10,
        model: str = "gmm-vae",
        guide: str | None = None,
        z_guide: str | None = None,
        epochs: int = 20,
        batch_size: int = 100,
        lr: float = 1e-3,
        options: dict | None = None,
        settings: dict | None = None,
        scale: str | None = "minmax",
        seed: int = 0,
        device: str = "cpu",
        threads: int | None = None,
        run_dir: str | None = None,
    ):
        self.n_clusters = n_clusters
        self.model, self.guide, self.z_guide = model, guide, z_guide
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.options, self.settings, self.scale = options, settings, scale
        self.seed, self.device, self.threads, self.run_dir = seed, device, threads, run_dir

    def fit(self, X, y=None):
        X, _ = self._check_X(X, reset=True)
        n = len(X)
        self._train(X, np.zeros(n, dtype=np.int64), np.zeros(n, bool), ("all",), {"clusters": self.n_clusters})
        self.labels_ = self.predict(X)
        return self

    @torch.no_grad()
    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X, _ = self._check_X(X, reset=False)
        return self.model_.responsibilities(self._images(X)).double().numpy()

    def predict(self, X) -> np.ndarray:
        return self.predict_proba(X).argmax(1)

    @torch.no_grad()
    def score(self, X, y=None) -> float:
        """The mean one-sample ELBO per row (nats): higher is better."""
        check_is_fitted(self)
        X, _ = self._check_X(X, reset=False)
        from pyrossl.scoring import separate_randomness

        with separate_randomness([self.seed, 0x5C0E], torch.device("cpu")):  # the same rows, the same score
            return float(self.model_.elbo_estimate(self._images(X)).mean())
