"""guides/label.py: every label guide fits M2's sites, trains, and stays finite at low temperature."""

import pytest
import torch
from pyro.infer import TraceEnum_ELBO, TraceMeanField_ELBO

from common import one_checked_step
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
        expected = sum(p * loss for p, loss in zip(probs, per_class)) - entropy
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


# --- the simplex-latent guides: alpha is a latent of the model --------------------------------------

LATENT_GUIDES = ["dirichlet", "logistic-normal-latent"]


def _last_linear(classifier):
    return [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)][-1]


def _set_logits(model, values):
    """Make the classifier output ``values`` for every image (a zero last layer, its bias = values)."""
    last = _last_linear(model.guide.classifier)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(values))


@pytest.mark.parametrize("guide", LATENT_GUIDES)
def test_simplex_latent_sites_and_gradients(guide):
    """alpha (or its logits) is drawn for labelled and unlabelled images alike; the model observes y."""
    from pyro import poutine

    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16], aux_weight=0.0), guide)
    site = model.guide.latent_site
    x, y = _batch()
    labelled = poutine.trace(model.guide).get_trace(x[:4], model.one_hot(y[:4]))
    assert [n for n, s in labelled.nodes.items() if s["type"] == "sample"] == ["data", site, "z"]
    replayed = poutine.trace(poutine.replay(model.model, trace=labelled)).get_trace(x[:4], model.one_hot(y[:4]))
    assert [n for n, s in replayed.nodes.items() if s["type"] == "sample"] == ["data", site, "y", "z", "x"]
    assert replayed.nodes["y"]["is_observed"] and not replayed.nodes[site]["is_observed"]
    unlabelled = poutine.trace(model.model).get_trace(x)
    assert "y" not in unlabelled.nodes  # y is observed where there is a label, absent otherwise
    # each term alone trains the classifier, the z-encoder and the decoder (the labelled one through alpha)
    for args in ((x,), (None, x[:4], y[:4])):
        model.zero_grad()
        loss = model(*args)
        assert torch.isfinite(loss)
        loss.backward()
        for part in (model.guide.classifier, model.guide.z_encoder, model.model.decoder):
            grads = [p.grad for p in part.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert sum(g.abs().sum() for g in grads) > 0
    if guide == "logistic-normal-latent":
        assert model.guide.logit_scale.weight.grad.abs().sum() > 0  # the learned scale of q(logits|x)


@pytest.mark.parametrize(
    "guide, options, logits",
    [
        ("dirichlet", {"dirichlet_concentration": 1e-3}, [50.0, -50.0, 0.0]),
        ("dirichlet", {"dirichlet_concentration": 1e3}, [50.0, -50.0, 0.0]),
        ("dirichlet", {"dirichlet_concentration": 1e-3}, [-50.0, -50.0, -50.0]),
        ("logistic-normal-latent", {"sharpness": 10.0}, [50.0, -50.0, 0.0]),
        ("logistic-normal-latent", {"sharpness": 10.0, "sigma": 1e-3}, [-50.0, 50.0, 50.0]),
    ],
)
def test_simplex_latent_guides_finite_at_extremes(guide, options, logits):
    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16], **options), guide)
    _set_logits(model, logits)
    x, y = _batch(64)
    loss = model(x, x[:16], y[:16])
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_dirichlet_prediction_is_the_mode_class_of_q():
    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16]), "dirichlet")
    x, _ = _batch(50)
    logits = model.guide.classifier(x)
    beta = model.guide.latent_distribution(x).concentration
    assert torch.equal(beta.argmax(-1), model.predict(x)) and torch.equal(logits.argmax(-1), model.predict(x))
    assert (beta >= model.guide.floor).all()
    latent = M2(META, M2Options(z_dim=2, hidden=[16]), "logistic-normal-latent")
    assert torch.equal(latent.guide.latent_distribution(x).mean.argmax(-1), latent.predict(x))


def _prior_of_latent(model, n):
    """The model's distribution at the latent site, read off a trace."""
    from pyro import poutine

    trace = poutine.trace(model.model).get_trace(num=n)
    return trace.nodes[model.guide.latent_site]["fn"]


@pytest.mark.parametrize(
    "guide, options",
    [
        ("dirichlet", {"dirichlet_concentration": 0.5}),
        ("dirichlet", {"dirichlet_concentration": 3.0}),
        ("logistic-normal-latent", {"sigma": 0.7}),
    ],
)
def test_latent_kl_matches_monte_carlo(guide, options):
    """KL(q(alpha|x) || p(alpha)) in closed form against the mean of log q - log p over many draws."""
    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16], **options), guide)
    x, _ = _batch(4)
    with torch.no_grad():
        if guide == "logistic-normal-latent":
            model.guide.logit_scale.weight.normal_(0.0, 0.1)  # a scale of its own per image
        q, p = model.guide.latent_distribution(x), _prior_of_latent(model, 4)
        closed = torch.distributions.kl_divergence(q, p)
        draws = q.sample((200_000,))
        mc = (q.log_prob(draws) - p.log_prob(draws)).mean(0)
    assert closed.shape == (4,)
    assert torch.allclose(mc, closed, rtol=0.02, atol=0.01), (mc, closed)


@pytest.mark.parametrize("guide", LATENT_GUIDES)
def test_trace_mean_field_elbo_takes_the_closed_form_kls(guide):
    """The loss, by hand: -log p(x|alpha, z) - log p(y|alpha) + KL_alpha + KL_z at the guide's draws.
    A Monte Carlo alpha term (log q - log p at the draw) would differ from it."""
    from pyro import poutine
    from torch.distributions import kl_divergence

    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16], aux_weight=0.0), guide)  # the ELBO alone, no log q(y|x) term
    x, y = _batch(6)
    y = model.one_hot(y)
    site = model.guide.latent_site
    with torch.no_grad():
        for args in ((x,), (x, y)):
            torch.manual_seed(1)
            loss = model.elbo.labelled.loss(model.model, model.guide, *args)
            torch.manual_seed(1)
            guide_trace = poutine.trace(model.guide).get_trace(*args)
            model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(*args)
            model_trace.compute_log_prob()
            guide_trace.compute_log_prob()
            q, p = guide_trace.nodes[site]["fn"], model_trace.nodes[site]["fn"]
            qz, pz = guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]
            observed = sum(model_trace.nodes[s]["log_prob_sum"] for s in ("x", "y") if s in model_trace.nodes)
            by_hand = -observed + kl_divergence(q, p).sum() + kl_divergence(qz, pz).sum()
            monte_carlo = -observed + sum(
                guide_trace.nodes[s]["log_prob_sum"] - model_trace.nodes[s]["log_prob_sum"] for s in (site, "z")
            )
            assert loss == pytest.approx(by_hand.item(), rel=1e-5)
            assert abs(loss - monte_carlo.item()) > 1e-3


@pytest.mark.parametrize("guide", LATENT_GUIDES)
@pytest.mark.parametrize("z_guide", ["flow", "lowrank-normal"])
def test_simplex_latent_guides_with_other_z_guides(guide, z_guide):
    from pyrossl.config import load_config
    from pyrossl.registry import build_model

    torch.manual_seed(0)
    meta = {"image_shape": (1, 8, 8), "num_classes": 4, "classes": [0, 1, 2, 3], "num_examples": 100}
    config = load_config(
        base={
            "model": "m2",
            "guide": guide,
            "z_guide": z_guide,
            "options": {"z_dim": 3, "hidden": [16], "flows": 1, "z_rank": 1},
        }
    )
    model = build_model(config, meta)
    assert model.guide.label_latent == model.model.label_latent
    x, y = torch.rand(10, 1, 8, 8), torch.randint(4, (10,))
    one_checked_step(model, x, x[:4], y[:4])
    assert torch.isfinite(model.log_likelihood(x[:3], 5)).all()
    assert model.latent(x[:3]).shape == (3, 3) and model.reconstruct(x[:3]).shape == (3, 1, 8, 8)
