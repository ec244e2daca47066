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
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO
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

    def __init__(
        self,
        num_mixtures: int,
        dim: int,
        n_components: int = 6,
        covariance_type: str = "full",
        reg_covar: float = 1e-4,
        n_init: int = 1,
        max_iter: int = 200,
        seed: int = 0,
    ):
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
            gm = GaussianMixture(
                k,
                covariance_type=self.covariance_type,
                reg_covar=self.reg_covar,
                n_init=self.n_init,
                max_iter=self.max_iter,
                random_state=self.seed + i,
            )
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
        return torch.distributions.MultivariateNormal(
            self.means, covariance_matrix=self.covariances, validate_args=False
        )

    def log_component_densities(self, x: torch.Tensor) -> torch.Tensor:
        """log w_cm + log N(x | mu_cm, Sigma_cm) for every point, mixture and component: [n, C, M]."""
        return self.components().log_prob(x[:, None, None, :]) + self.log_weights

    def log_densities(self, x: torch.Tensor) -> torch.Tensor:
        """log p_c(x) of every mixture: [n, C]."""
        return self.log_component_densities(x).logsumexp(-1)

    def responsibilities(self, x: torch.Tensor, mixture: int = 0) -> torch.Tensor:
        """p(component | x) within one mixture: [n, M]."""
        return self.log_component_densities(x)[:, mixture].softmax(-1)

    def sample(
        self, n: int, mixture: int, component: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
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

    def __init__(
        self,
        num_classes: int,
        dim: int,
        n_components: int = 6,
        covariance_type: str = "full",
        reg_covar: float = 1e-4,
        n_init: int = 1,
        novelty_quantile: float = 0.01,
        seed: int = 0,
    ):
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
            raise ConfigError(
                f"every class needs at least 2 labelled examples to fit its mixture; class(es) {missing} have fewer"
            )
        self.mixtures.fit([x[y == c] for c in range(self.num_classes)])
        self.log_prior.copy_((counts.double() / counts.sum()).log().to(self.log_prior))
        scores = self.score_samples(x)
        self.threshold.fill_(
            torch.quantile(scores.double(), self.novelty_quantile).item() if self.novelty_quantile else -math.inf
        )
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
        """``n`` points and their classes: of class ``y`` (an int, or one class per point), or of classes
        drawn from p(c)."""
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


class PyroGaussianMixture(nn.Module):
    """A Gaussian mixture written as a Pyro model, fitted by EM with the E-step done by enumeration.

        c_n ~ Cat(pi),   z_n ~ N(mu_{c_n}, Sigma_{c_n})        (full or diagonal covariances)

    The E-step asks Pyro for the posterior of the enumerated site ``c`` given the points
    (``TraceEnum_ELBO.compute_marginals``: exact, all components in parallel); the M-step is the
    closed-form maximum-likelihood update of pi, mu and Sigma under those responsibilities, with
    ``reg_covar`` added to each covariance's diagonal. Initialisation is seeded greedy k-means++ (each
    centre the best of 2 + log K candidates, as scikit-learn's k-means does) and Lloyd's algorithm run
    to convergence; with ``n_init`` > 1 the restart with the highest log-likelihood wins. The
    log-likelihood is the same program's ``TraceEnum_ELBO`` with an empty guide, which is exact:
    log p(z) = log sum_c p(c) p(z|c). Parameters are buffers: a fitted mixture is a ``state_dict``.
    """

    def __init__(
        self,
        n_components: int,
        dim: int,
        reg_covar: float = 1e-6,
        max_iter: int = 200,
        tol: float = 1e-4,
        n_init: int = 1,
        seed: int = 0,
        covariance_type: str = "full",
    ):
        super().__init__()
        check_mixture_options(n_components, covariance_type, reg_covar)
        if covariance_type not in ("full", "diag"):
            raise ConfigError(f"PyroGaussianMixture has full or diag covariances, not '{covariance_type}'")
        self.reg_covar, self.max_iter, self.tol, self.n_init, self.seed = reg_covar, max_iter, tol, n_init, seed
        self.covariance_type = covariance_type
        k, d = n_components, dim
        self.register_buffer("log_weights", torch.full((k,), -math.log(k)))
        self.register_buffer("means", torch.zeros(k, d))
        self.register_buffer("scale_tril", torch.eye(d).expand(k, d, d).clone())
        self.elbo = TraceEnum_ELBO(max_plate_nesting=1)
        self.n_iter = 0

    @property
    def n_components(self) -> int:
        return self.log_weights.shape[0]

    # --- the Pyro program -------------------------------------------------------------------
    def model(self, z: torch.Tensor) -> None:
        with pyro.plate("data", z.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=self.log_weights), infer={"enumerate": "parallel"})
            pyro.sample("z", dist.MultivariateNormal(self.means[c], scale_tril=self.scale_tril[c]), obs=z)

    def guide(self, z: torch.Tensor) -> None:
        """Nothing to sample: c is enumerated in the model."""

    @torch.no_grad()
    def log_likelihood(self, z: torch.Tensor) -> float:
        """sum_n log p(z_n), exact (the enumerated ELBO with an empty guide)."""
        return -self.elbo.loss(self.model, self.guide, z)

    @torch.no_grad()
    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """p(c | z_n) for every point: [n, K] (Pyro's exact marginal of the enumerated site)."""
        return self.elbo.compute_marginals(self.model, self.guide, z)["c"].probs

    @torch.no_grad()
    def predict(self, z: torch.Tensor) -> torch.Tensor:
        return self.responsibilities(z).argmax(-1)

    # --- EM -----------------------------------------------------------------------------------
    def _kmeans_init(self, z: torch.Tensor, g: torch.Generator, max_steps: int = 300) -> torch.Tensor:
        """Hard assignments from seeded k-means++ and Lloyd steps until no point changes cluster."""
        n, k = z.shape[0], self.n_components
        trials = 2 + int(math.log(k))
        centres = z[torch.randint(n, (1,), generator=g)]
        d2 = torch.cdist(z, centres).pow(2).min(1).values
        for _ in range(1, k):
            candidates = z[torch.multinomial(d2 / d2.sum(), trials, replacement=True, generator=g)]
            new_d2 = torch.minimum(d2[None], torch.cdist(candidates, z).pow(2))  # [trials, n]
            best = new_d2.sum(1).argmin()
            centres, d2 = torch.cat([centres, candidates[best, None]]), new_d2[best]
        labels = torch.cdist(z, centres).argmin(1)
        for _ in range(max_steps):
            for j in range(k):
                members = z[labels == j]
                if members.shape[0]:
                    centres[j] = members.mean(0)
            new_labels = torch.cdist(z, centres).argmin(1)
            if torch.equal(new_labels, labels):
                break
            labels = new_labels
        return torch.nn.functional.one_hot(labels, k).to(z.dtype)

    def _m_step(self, z: torch.Tensor, resp: torch.Tensor) -> None:
        n, d = z.shape
        counts = resp.sum(0) + 10 * torch.finfo(z.dtype).eps
        means = resp.T @ z / counts[:, None]
        diff = z[None] - means[:, None]  # [K, n, d]
        self.log_weights.copy_((counts / n).log().to(self.log_weights))
        self.means.copy_(means.to(self.means))
        if self.covariance_type == "diag":
            var = torch.einsum("kn,kni->ki", resp.T, diff.pow(2)) / counts[:, None] + self.reg_covar
            self.scale_tril.copy_(torch.diag_embed(var.sqrt()).to(self.scale_tril))
            return
        cov = torch.einsum("kn,kni,knj->kij", resp.T, diff, diff) / counts[:, None, None]
        cov = cov + self.reg_covar * torch.eye(d, dtype=z.dtype)
        self.scale_tril.copy_(torch.linalg.cholesky(cov).to(self.scale_tril))

    @torch.no_grad()
    def fit(self, z: torch.Tensor) -> PyroGaussianMixture:
        """Maximum-likelihood fit of the mixture to the points ``z`` [n, d] by EM; returns self."""
        if z.shape[0] < self.n_components:
            raise ConfigError(f"{z.shape[0]} points cannot fit a mixture of {self.n_components} components")
        device, dtype = self.means.device, self.means.dtype
        self.double().cpu()
        z64 = z.detach().cpu().double()
        g = torch.Generator().manual_seed(self.seed)
        best, best_ll, best_iter = None, -math.inf, 0
        for _ in range(self.n_init):
            self._m_step(z64, self._kmeans_init(z64, g))
            ll = self.log_likelihood(z64) / z64.shape[0]
            for iteration in range(1, self.max_iter + 1):  # noqa: B007 (read after the loop: the iterations it took)
                self._m_step(z64, self.responsibilities(z64))
                new_ll = self.log_likelihood(z64) / z64.shape[0]
                converged = abs(new_ll - ll) < self.tol
                ll = new_ll
                if converged:
                    break
            if ll > best_ll:
                best, best_ll, best_iter = {k: v.clone() for k, v in self.state_dict().items()}, ll, iteration
        self.load_state_dict(best)
        self.n_iter = best_iter
        self.to(device, dtype)
        return self
