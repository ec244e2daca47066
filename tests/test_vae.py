import pyro
import torch

from pyrossl.evaluate import iwae_log_likelihood
from pyrossl.infer.iwae import importance_log_weights
from pyrossl.models.vae import VAE, VAEOptions

META = {"image_shape": (1, 8, 8), "num_classes": 10}


def _x(n=16):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_loss_is_finite_and_every_parameter_gets_a_gradient():
    model = VAE(META, VAEOptions(z_dim=3, hidden=[20]))
    loss = model(_x())
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert len(pyro.get_param_store()) == 0  # parameters live in the module, not the global store


def test_elbo_matches_a_direct_computation():
    """With the encoder's scale pushed to ~0, the ELBO is log p(x|mu) - KL(N(mu, s) || N(0, I))."""
    torch.manual_seed(0)
    model = VAE(META, VAEOptions(z_dim=2, hidden=[10]))
    x = _x(4)
    loc, scale = model.guide.encode(x)
    q = torch.distributions.Normal(loc, scale)
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    # Monte Carlo over many single-sample ELBOs for the reconstruction term
    recon = torch.stack(
        [
            -torch.nn.functional.binary_cross_entropy_with_logits(
                model.model.decoder(q.rsample()), x.flatten(1), reduction="none"
            ).sum(-1)
            for _ in range(2000)
        ]
    ).mean(0)
    elbo = torch.stack([-model.loss(x) for _ in range(2000)]).mean()
    assert torch.allclose(elbo, (recon - kl).sum(), rtol=2e-3)


def test_iwae_bound_is_above_the_elbo_and_grows_with_k():
    torch.manual_seed(0)
    model = VAE(META, VAEOptions(z_dim=2, hidden=[10]))
    x = _x(8)
    with torch.no_grad():
        log_w = importance_log_weights(model.model, model.guide, x, num_samples=4000)
        assert log_w.shape == (4000, 8)
        elbo = log_w.mean(0)
        l1 = iwae_log_likelihood(log_w[:1])
        l4000 = iwae_log_likelihood(log_w)

        def expected_bound(k):  # E[L_k], averaged over 4000 / k independent estimates
            return torch.stack([iwae_log_likelihood(c) for c in log_w.split(k)]).mean()

        assert elbo.mean() < expected_bound(10) < expected_bound(100) < expected_bound(1000)
    assert torch.allclose(l1, log_w[0])
    assert (l4000 >= elbo).all()
    est = model.log_likelihood(x, 50, batch_size=3)
    assert est.shape == (8,) and (est > elbo - 1.0).all()


def test_beta_scales_training_but_not_the_likelihood():
    torch.manual_seed(0)
    plain = VAE(META, VAEOptions(z_dim=2, hidden=[10]))
    heavy = VAE(META, VAEOptions(z_dim=2, hidden=[10], beta=4.0))
    heavy.load_state_dict(plain.state_dict())
    x = _x(4)
    torch.manual_seed(1)
    a = importance_log_weights(plain.model, plain.guide, x, num_samples=5)
    torch.manual_seed(1)
    b = importance_log_weights(heavy.model, heavy.guide, x, num_samples=5)
    assert torch.allclose(a, b)


def test_beta_weights_the_analytic_kl_of_the_training_loss():
    torch.manual_seed(0)
    model = VAE(META, VAEOptions(z_dim=2, hidden=[10], beta=4.0))
    x = _x(6)
    loc, scale = model.guide.encode(x)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(loc, scale), torch.distributions.Normal(0.0, 1.0)
    ).sum()
    torch.manual_seed(1)
    heavy = model(x) * 6
    model.set_beta(1.0)
    torch.manual_seed(1)
    plain = model(x) * 6
    assert torch.allclose(heavy - plain, 3 * kl, rtol=1e-4)
    model.set_beta(4.0)
    model.evaluate(x, torch.zeros(6))  # scores the ELBO with beta = 1, and puts beta back
    assert model.model.beta == model.guide.kl_weight == 4.0


def test_conv_network_on_28x28():
    model = VAE({"image_shape": (1, 28, 28)}, VAEOptions(z_dim=3, hidden=[32], net="conv"))
    x = torch.rand(5, 1, 28, 28)
    assert torch.isfinite(model(x))
    assert model.reconstruct(x).shape == x.shape and model.sample(2).shape == (2, 1, 28, 28)
    assert model.log_likelihood(x, 3).shape == (5,)
