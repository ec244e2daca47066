"""Gaussian mixtures on latent codes, as torch modules with scikit-learn's estimator API.

:class:`MixtureStack` holds ``C`` independent Gaussian mixtures of up to ``M`` components each, in
buffers (so a checkpoint is plain tensors and ``load_state_dict`` restores a fitted stack). Fitting is
scikit-learn's EM (``sklearn.mixture.GaussianMixture``): for a fixed set of codes the maximum-likelihood
mixture has closed-form EM updates, and scikit-learn's implementation (k-means initialisation,
covariance regularisation, convergence checks, float64) is faster and more reliable than fitting the
same mixture by stochastic gradients. Scoring and sampling run in torch, on the codes' device.

:class:`GaussianMixtureClassifier` is one mixture per class (the generative classifier
p(c|z) ∝ p(c) p(z|c)) with a likelihood threshold for novelty ("none of the classes").
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from pyrossl.errors import ConfigError

COVARIANCE_TYPES = ("full", "diag", "tied", "spherical")


def check_mixture_options(n_components: int, covariance_type: str, reg_covar: float) -> None:
    if n_components < 1:
        raise ConfigError(f"the number of mixture components must be at least 1, not {n_components}")
    if covariance_type not in COVARIANCE_TYPES:
        raise ConfigError(f"covariance type must be one of {', '.join(COVARIANCE_TYPES)}, not '{covariance_type}'")
    if not reg_covar > 0:
        raise ConfigError(f"reg_covar must be positive, not {reg_covar}")


def _full_covariances(gm, dim: int) -> np.ndarray:
    """A fitted GaussianMixture's covariances as [M, d, d] matrices, whatever its covariance type."""
    cov, m = gm.covariances_, gm.n_components
    if gm.covariance_type == "full":
        return cov
    if gm.covariance_type == "tied":
        return np.broadcast_to(cov, (m, dim, dim))
    if gm.covariance_type == "diag":
        return np.stack([np.diag(c) for c in cov])
    return cov[:, None, None] * np.eye(dim)  # spherical


class MixtureStack(nn.Module):
    """``num_mixtures`` Gaussian mixtures over ``dim``-dimensional points, each of up to ``n_components``.

    A mixture fitted on fewer points than ``n_components`` keeps the extra components with weight 0.
    """

    def __init__(self, num_mixtures: int, dim: int, n_components: int = 6, covariance_type: str = "full",
                 reg_covar: float = 1e-4, n_init: int = 1, max_iter: int = 200, seed: int = 0):
        super().__init__()
        check_mixture_options(n_components, covariance_type, reg_covar)
        self.covariance_type, self.reg_covar = covariance_type, reg_covar
        self.n_init, self.max_iter, self.seed = n_init, max_iter, seed
        c, m, d = num_mixtures, n_components, dim
        self.register_buffer("log_weights", torch.full((c, m), -math.log(m)))
        self.register_buffer("means", torch.zeros(c, m, d))
        self.register_buffer("covariances", torch.eye(d).expand(c, m, d, d).clone())
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.means.shape)

    def fit(self, points: list[torch.Tensor]) -> MixtureStack:
        """Fit mixture ``i`` to ``points[i]`` ([n_i, d]) by EM; returns self."""
        from sklearn.mixture import GaussianMixture

        c, m, d = self.shape
        if len(points) != c:
            raise ValueError(f"expected points for {c} mixtures, got {len(points)}")
        log_w = torch.full((c, m), -math.inf, dtype=torch.float64)
        means = torch.zeros(c, m, d, dtype=torch.float64)
        covs = torch.eye(d, dtype=torch.float64).expand(c, m, d, d).clone()
        for i, x in enumerate(points):
            x = x.detach().cpu().double().numpy()
            if x.shape[0] < 2:
                raise ConfigError(f"mixture {i} has {x.shape[0]} point(s) to fit: it needs at least 2")
            k = min(m, x.shape[0])
            gm = GaussianMixture(k, covariance_type=self.covariance_type, reg_covar=self.reg_covar,
                                 n_init=self.n_init, max_iter=self.max_iter, random_state=self.seed + i)
            gm.fit(x)
            log_w[i, :k] = torch.from_numpy(np.log(gm.weights_))
            means[i, :k] = torch.from_numpy(gm.means_)
            covs[i, :k] = torch.from_numpy(np.array(_full_covariances(gm, d)))
        dtype, device = self.means.dtype, self.means.device
        self.log_weights.copy_(log_w.to(device, dtype))
        self.means.copy_(means.to(device, dtype))
        self.covariances.copy_(covs.to(device, dtype))
        self.fitted.fill_(True)
        return self

    def components(self) -> torch.distributions.MultivariateNormal:
        """The components as one batched distribution of batch shape [C, M]."""
        return torch.distributions.MultivariateNormal(self.means, covariance_matrix=self.covariances, validate_args=False)

    def log_component_densities(self, x: torch.Tensor) -> torch.Tensor:
        """log w_cm + log N(x | mu_cm, Sigma_cm) for every point, mixture and component: [n, C, M]."""
        return self.components().log_prob(x[:, None, None, :]) + self.log_weights

    def log_densities(self, x: torch.Tensor) -> torch.Tensor:
        """log p_c(x) of every mixture: [n, C]."""
        return self.log_component_densities(x).logsumexp(-1)

    def responsibilities(self, x: torch.Tensor, mixture: int = 0) -> torch.Tensor:
        """p(component | x) within one mixture: [n, M]."""
        return self.log_component_densities(x)[:, mixture].softmax(-1)

    def sample(self, n: int, mixture: int, component: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points from one mixture (or from one of its components): [n, d]."""
        comps = self.components()
        loc, tril = comps.loc[mixture], comps.scale_tril[mixture]
        if component is None:
            weights = self.log_weights[mixture].exp()
            which = torch.multinomial(weights.cpu(), n, replacement=True, generator=generator).to(loc.device)
        else:
            which = torch.full((n,), component, dtype=torch.long, device=loc.device)
        eps = torch.randn(n, loc.shape[-1], generator=generator).to(loc)
        return loc[which] + (tril[which] @ eps[:, :, None])[..., 0]


class GaussianMixtureClassifier(nn.Module):
    """One Gaussian mixture per class: p(c|x) = p(c) p(x|c) / sum_k p(k) p(x|k).

    The estimator API of scikit-learn: ``fit(X, y)``, ``predict``, ``predict_proba``,
    ``score_samples`` (log p(x) = log sum_c p(c) p(x|c)) and ``sample(n, y)``. ``novelty_quantile``
    sets the threshold of :meth:`is_novel`: the log p(x) that this fraction of the training points
    falls below; a point under it belongs to none of the classes.
    """

    def __init__(self, num_classes: int, dim: int, n_components: int = 6, covariance_type: str = "full",
                 reg_covar: float = 1e-4, n_init: int = 1, novelty_quantile: float = 0.01, seed: int = 0):
        super().__init__()
        if not 0 <= novelty_quantile < 1:
            raise ConfigError(f"novelty_quantile must be in [0, 1), not {novelty_quantile}")
        self.novelty_quantile = novelty_quantile
        self.mixtures = MixtureStack(num_classes, dim, n_components, covariance_type, reg_covar, n_init, seed=seed)
        self.register_buffer("log_prior", torch.full((num_classes,), -math.log(num_classes)))
        self.register_buffer("threshold", torch.tensor(-math.inf))

    @property
    def num_classes(self) -> int:
        return self.log_prior.shape[0]

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> GaussianMixtureClassifier:
        """One mixture per class on the rows of ``x`` [n, d] with labels ``y`` [n]; the class prior is y's frequency."""
        y = y.to(x.device)
        counts = torch.bincount(y, minlength=self.num_classes)
        missing = (counts < 2).nonzero().flatten().tolist()
        if missing:
            raise ConfigError(f"every class needs at least 2 labelled examples to fit its mixture; class(es) {missing} have fewer")
        self.mixtures.fit([x[y == c] for c in range(self.num_classes)])
        self.log_prior.copy_((counts.double() / counts.sum()).log().to(self.log_prior))
        scores = self.score_samples(x)
        self.threshold.fill_(torch.quantile(scores.double(), self.novelty_quantile).item() if self.novelty_quantile else -math.inf)
        return self

    def joint_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log p(c) + log p(x|c): [n, C]."""
        return self.mixtures.log_densities(x) + self.log_prior

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.joint_log_likelihood(x).softmax(-1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.joint_log_likelihood(x).argmax(-1)

    def score_samples(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) under the class-weighted mixture of mixtures: [n]."""
        return self.joint_log_likelihood(x).logsumexp(-1)

    def is_novel(self, x: torch.Tensor) -> torch.Tensor:
        """True where log p(x) is under the threshold: the point looks like none of the classes."""
        return self.score_samples(x) < self.threshold

    def sample(self, n: int, y: int | torch.Tensor | None = None, generator: torch.Generator | None = None):
        """``n`` points and their classes: of class ``y`` (an int, or one class per point), or of classes drawn from p(c)."""
        device = self.log_prior.device
        if y is None:
            y = torch.multinomial(self.log_prior.exp().cpu(), n, replacement=True, generator=generator)
        elif isinstance(y, int):
            y = torch.full((n,), y, dtype=torch.long)
        y = torch.as_tensor(y).cpu()
        x = torch.empty(n, self.mixtures.shape[-1], device=device)
        for c in y.unique().tolist():
            rows = (y == c).nonzero().flatten()
            x[rows.to(device)] = self.mixtures.sample(rows.numel(), c, generator=generator)
        return x, y.to(device)
