import math

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from pyrossl.errors import ConfigError
from pyrossl.mixture import GaussianMixtureClassifier, MixtureStack


def _blobs(n=300, seed=0):
    """Three classes in 2-D; class 2 is itself two separated blobs."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0]])
    labels = torch.tensor([0, 1, 2, 2])
    which = torch.randint(4, (n,), generator=g)
    x = centres[which] + 0.7 * torch.randn(n, 2, generator=g)
    return x, labels[which]


@pytest.mark.parametrize("covariance", ["full", "diag", "tied", "spherical"])
def test_stack_densities_equal_scikit_learn(covariance):
    x, _ = _blobs()
    stack = MixtureStack(1, 2, n_components=3, covariance_type=covariance, seed=4).fit([x])
    reference = GaussianMixture(3, covariance_type=covariance, reg_covar=1e-4, random_state=4, max_iter=200).fit(
        x.double().numpy()
    )
    ours = stack.log_densities(x)[:, 0].double().numpy()
    np.testing.assert_allclose(ours, reference.score_samples(x.double().numpy()), rtol=1e-4, atol=1e-4)
    resp = stack.responsibilities(x).double().numpy()
    np.testing.assert_allclose(resp, reference.predict_proba(x.double().numpy()), atol=1e-4)


def test_a_mixture_with_fewer_points_than_components_keeps_the_rest_at_weight_zero():
    x = torch.randn(3, 2)
    stack = MixtureStack(2, 2, n_components=5).fit([x, torch.randn(40, 2)])
    assert torch.isinf(stack.log_weights[0, 3:]).all() and torch.isfinite(stack.log_weights[1]).all()
    assert torch.isfinite(stack.log_densities(torch.randn(7, 2))).all()
    assert torch.isclose(stack.log_weights.logsumexp(-1), torch.zeros(2), atol=1e-5).all()
    samples = stack.sample(50, 0)
    assert samples.shape == (50, 2) and torch.isfinite(samples).all()


def test_classifier_estimator_api():
    x, y = _blobs(600)
    clf = GaussianMixtureClassifier(3, 2, n_components=2, seed=0).fit(x, y)
    xt, yt = _blobs(300, seed=1)
    assert (clf.predict(xt) == yt).double().mean() > 0.97
    proba = clf.predict_proba(xt)
    assert proba.shape == (300, 3) and torch.allclose(proba.sum(-1), torch.ones(300))
    assert torch.equal(proba.argmax(-1), clf.predict(xt))
    # log p(x) = log sum_c p(c) p(x|c), with p(c) the label frequencies
    prior = torch.bincount(y, minlength=3).double() / len(y)
    expected = (clf.mixtures.log_densities(xt).double() + prior.log()).logsumexp(-1)
    assert torch.allclose(clf.score_samples(xt).double(), expected, atol=1e-4)
    # class 2 is two blobs: its mixture puts one component on each
    means = clf.mixtures.means[2]
    assert torch.cdist(means, torch.tensor([[0.0, 6.0], [6.0, 6.0]])).min(0).values.max() < 0.3


def test_sampling_a_class_gives_points_the_classifier_puts_in_that_class():
    x, y = _blobs(600)
    clf = GaussianMixtureClassifier(3, 2, n_components=2).fit(x, y)
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        points, labels = clf.sample(200, c, generator=g)
        assert (labels == c).all()
        assert (clf.predict(points) == c).double().mean() > 0.95
    points, labels = clf.sample(300, generator=g)
    assert torch.bincount(labels, minlength=3).min() > 50  # classes drawn from p(c)
    mixed = torch.tensor([0, 1, 2] * 10)
    points, labels = clf.sample(30, mixed, generator=g)
    assert torch.equal(labels, mixed) and (clf.predict(points) == mixed).double().mean() > 0.9


def test_novelty_threshold_rejects_far_points_and_keeps_its_training_quantile():
    x, y = _blobs(1000)
    clf = GaussianMixtureClassifier(3, 2, n_components=2, novelty_quantile=0.05).fit(x, y)
    rate = clf.is_novel(x).double().mean().item()
    assert 0.03 < rate < 0.07
    far = torch.tensor([[30.0, -30.0], [-20.0, 3.0], [3.0, 40.0]])
    assert clf.is_novel(far).all()
    assert not GaussianMixtureClassifier(3, 2, novelty_quantile=0.0).fit(x, y).is_novel(far).any()


def test_state_dict_round_trip_restores_a_fitted_classifier():
    x, y = _blobs(400)
    clf = GaussianMixtureClassifier(3, 2, n_components=2).fit(x, y)
    fresh = GaussianMixtureClassifier(3, 2, n_components=2)
    assert not bool(fresh.mixtures.fitted)
    fresh.load_state_dict(clf.state_dict())
    assert bool(fresh.mixtures.fitted)
    assert torch.equal(fresh.predict_proba(x), clf.predict_proba(x))
    assert fresh.threshold == clf.threshold and math.isfinite(fresh.threshold.item())


def test_bad_settings_and_classes_without_examples_are_config_errors():
    with pytest.raises(ConfigError, match="covariance type"):
        MixtureStack(1, 2, covariance_type="banded")
    with pytest.raises(ConfigError, match="at least 1"):
        MixtureStack(1, 2, n_components=0)
    with pytest.raises(ConfigError, match="novelty_quantile"):
        GaussianMixtureClassifier(2, 2, novelty_quantile=1.0)
    x, y = _blobs(100)
    with pytest.raises(ConfigError, match=r"class\(es\) \[3\]"):
        GaussianMixtureClassifier(4, 2).fit(x, y)


def _planted(n=900, seed=0):
    """Three Gaussians in 2-D with weights 0.5, 0.3, 0.2 and different covariances."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor([0.5, 0.3, 0.2])
    means = torch.tensor([[0.0, 0.0], [5.0, 1.0], [-1.0, 6.0]])
    trils = torch.tensor([[[1.0, 0.0], [0.5, 0.6]], [[0.4, 0.0], [0.0, 1.2]], [[0.8, 0.0], [-0.3, 0.5]]])
    c = torch.multinomial(weights, n, replacement=True, generator=g)
    z = means[c] + (trils[c] @ torch.randn(n, 2, 1, generator=g))[..., 0]
    return z, c, weights, means, trils


def test_pyro_gmm_recovers_a_planted_mixture():
    from pyrossl.mixture import PyroGaussianMixture

    z, c, weights, means, trils = _planted()
    gmm = PyroGaussianMixture(3, 2, seed=0).fit(z)
    order = torch.cdist(means, gmm.means).argmin(1)  # planted component -> fitted component
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(gmm.means[order], means, atol=0.15)
    assert torch.allclose(gmm.log_weights.exp()[order], weights, atol=0.04)
    cov = gmm.scale_tril @ gmm.scale_tril.transpose(-1, -2)
    assert torch.allclose(cov[order], trils @ trils.transpose(-1, -2), atol=0.2)
    assert (gmm.predict(z) == order[c]).double().mean() > 0.97
    resp = gmm.responsibilities(z)
    assert resp.shape == (900, 3) and torch.allclose(resp.sum(-1), torch.ones(900))
    assert len(__import__("pyro").get_param_store()) == 0


def test_pyro_gmm_scores_at_least_as_well_as_scikit_learn_and_is_deterministic():
    from pyrossl.mixture import PyroGaussianMixture

    g = torch.Generator().manual_seed(3)
    z = torch.cat([torch.randn(200, 4, generator=g) + 3 * torch.randn(1, 4, generator=g) for _ in range(5)])
    ours = PyroGaussianMixture(5, 4, n_init=3, seed=1).fit(z)
    sk = GaussianMixture(5, covariance_type="full", reg_covar=1e-6, n_init=3, random_state=1).fit(z.double().numpy())
    mean_ll = ours.log_likelihood(z) / z.shape[0]
    assert mean_ll >= sk.score(z.double().numpy()) - 1e-3
    # the exact log-likelihood from Pyro's enumeration equals a direct log-sum-exp
    comps = torch.distributions.MultivariateNormal(ours.means, scale_tril=ours.scale_tril)
    direct = (comps.log_prob(z[:, None]) + ours.log_weights).logsumexp(-1).sum()
    assert ours.log_likelihood(z) == pytest.approx(direct.item(), rel=1e-5)
    again = PyroGaussianMixture(5, 4, n_init=3, seed=1).fit(z)
    assert torch.equal(again.means, ours.means) and torch.equal(again.scale_tril, ours.scale_tril)
