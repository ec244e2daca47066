"""guides/label.py: every label guide fits M2's sites, trains, and stays finite at low temperature."""

import pytest
import torch
from pyro.infer import TraceEnum_ELBO, TraceMeanField_ELBO

from pyrossl.guides.label import LABEL_GUIDES, ConditionalGaussianEncoder
from pyrossl.models.m2 import M2, M2Options

META = {"image_shape": (1, 8, 8), "num_classes": 3, "classes": ("a", "b", "c")}


def _batch(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(3, (n,), generator=g)


@pytest.mark.parametrize("guide", sorted(LABEL_GUIDES))
def test_gradients_reach_every_network(guide):
    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16]), guide)
    x, y = _batch()
    loss = model(x, x[:4], y[:4])
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the unlabelled term alone must train the classifier through the label site
    model.zero_grad()
    model(x).backward()
    grads = [p.grad for p in model.guide.classifier.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("guide", ["gumbel", "st-gumbel"])
def test_finite_at_low_temperature(guide):
    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16], temperature_start=1e-3, temperature_end=1e-3), guide)
    model.start_epoch(1)
    assert model.guide.temperature == pytest.approx(1e-3)
    x, _ = _batch(64)
    with torch.no_grad():  # large logits make relaxed samples underflow to exact zeros
        model.guide.classifier[1][-1].bias.copy_(torch.tensor([30.0, -30.0, 0.0]))
    loss = model(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_temperature_schedule():
    model = M2(META, M2Options(temperature_start=2.0, temperature_end=0.5, temperature_anneal=0.5), "gumbel")
    temps = [model.start_epoch(e)["temperature"] for e in (1, 2, 10)]
    assert temps[0] == pytest.approx(2.0) and temps[1] == pytest.approx(2.0 * 0.6065, rel=1e-3) and temps[2] == 0.5
    assert M2(META, M2Options(), "enum").start_epoch(1) == {}


def test_enumeration_computes_the_exact_expectation_over_classes():
    """U(x) with enum = sum_y q(y|x) L(x, y) + H(q(y|x)), checked against per-class labelled losses."""
    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16], aux_weight=0.0), "enum")
    x, _ = _batch(1)
    probs = model.predict_proba(x)[0]

    # the same estimators with many particles in parallel
    unlabelled = TraceEnum_ELBO(max_plate_nesting=1, num_particles=20000, vectorize_particles=True)
    labelled = TraceMeanField_ELBO(num_particles=20000, vectorize_particles=True)
    with torch.no_grad():
        unsup = unlabelled.loss(model.model, model.guide, x)
        per_class = [labelled.loss(model.model, model.guide, x, model.one_hot(torch.tensor([c]))) for c in range(3)]
        entropy = -(probs * probs.log()).sum()
        expected = sum(p * l for p, l in zip(probs, per_class)) - entropy
    assert unsup == pytest.approx(expected.item(), rel=5e-3)


def test_conditional_encoder_equals_concatenation():
    enc = ConditionalGaussianEncoder(torch.nn.Flatten(), 16, 3, 2, [8], "relu")
    x, y = torch.rand(5, 1, 4, 4), torch.eye(3)[[0, 1, 2, 1, 0]]
    w = torch.cat([enc.from_x.weight, enc.from_y.weight], 1)
    h = torch.relu(torch.cat([x.flatten(1), y], 1) @ w.T + enc.from_x.bias)
    loc, _ = enc(x, y)
    assert torch.allclose(loc, enc.loc(h), atol=1e-6)
    # enumerated y ([K, 1, K]) broadcasts against x: [K, B, z]
    assert enc(x, torch.eye(3).reshape(3, 1, 3))[0].shape == (3, 5, 2)


def test_shared_trunk_is_one_module_under_both_networks():
    model = M2(META, M2Options(z_dim=2, hidden=[16], shared_trunk=True), "enum")
    trunk = model.guide.classifier[0]
    assert model.guide.z_encoder.features is trunk
    x, y = _batch()
    model(x, x[:4], y[:4]).backward()
    assert trunk[1].weight.grad is not None and trunk[1].weight.grad.abs().sum() > 0
    state = model.state_dict()
    fresh = M2(META, M2Options(z_dim=2, hidden=[16], shared_trunk=True), "enum")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.predict(x), model.predict(x))
