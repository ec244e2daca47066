"""CCVAE: the objective against a direct computation, the conditional prior, enumeration, training."""

import math

import pyro
import pytest
import torch
from pyro import poutine

from common import tiny_config
from pyrossl.models.ccvae import CCVAE, CCVAE_ELBO, CCVAELabelled_ELBO, CCVAEOptions, ConditionalPrior
from pyrossl.run import load_run
from pyrossl.train import train

META = {
    "image_shape": (1, 8, 8),
    "num_features": 64,
    "num_classes": 3,
    "classes": ("a", "b", "c"),
    "attributes": (),
    "multilabel": False,
    "num_examples": 10,
}
MULTI = {**META, "num_classes": 4, "classes": (), "attributes": ("p", "q", "r", "s"), "multilabel": True}


def _entry(meta=META, **options):
    torch.manual_seed(0)
    entry = CCVAE(meta, CCVAEOptions(**{"z_style": 2, "hidden": [16], "k": 5, **options}))
    with torch.no_grad():  # a prior that is not the initial one, so every term matters
        entry.model.prior.loc.add_(0.3 * torch.randn_like(entry.model.prior.loc))
        entry.model.prior.log_scale.add_(0.2 * torch.randn_like(entry.model.prior.log_scale))
        entry.guide.classifier.weight.mul_(1.5)
    return entry


def _normal(v, loc, scale):
    return (-0.5 * ((v - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def _bernoulli_pixels(x, logits):
    return (x * logits - torch.nn.functional.softplus(logits)).sum(-1)


def test_labelled_objective_is_equation_4_computed_directly():
    entry = _entry()
    entry.set_label_prior(torch.tensor([0, 0, 1, 2, 2, 2]))
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 2, 1, 0])
    pyro.set_rng_seed(1)
    terms = CCVAELabelled_ELBO.labelled_terms(entry.model, entry.guide, x, y)
    pyro.set_rng_seed(1)  # the same draws: the guide runs first in labelled_terms
    trace = poutine.trace(entry.guide).get_trace(x, y)
    z_c, z_s = trace.nodes["z_c"]["value"], trace.nodes["z_s"]["value"]
    with torch.no_grad():
        loc, scale = entry.guide.encode(x)
        c = 3
        log_qz = _normal(z_c, loc[:, :c], scale[:, :c]) + _normal(z_s, loc[:, c:], scale[:, c:])
        p_loc, p_scale = entry.model.prior.loc[y], entry.model.prior.log_scale[y].exp()
        log_pz = _normal(z_c, p_loc, p_scale) + _normal(z_s, torch.zeros_like(z_s), torch.ones_like(z_s))
        log_px = _bernoulli_pixels(x.flatten(1), entry.model.decoder(torch.cat([z_c, z_s], -1)))
        logits = z_c * entry.guide.classifier.weight + entry.guide.classifier.bias
        log_qy_zc = logits.log_softmax(-1)[torch.arange(6), y]
        component = trace.nodes["y_x"]["fn"].component_distribution.logits  # [B, k, K]: the k classifiers
        log_qy_x = torch.logsumexp(component.log_softmax(-1)[torch.arange(6), :, y], -1) - math.log(5)
        log_py = torch.log(torch.tensor([2, 1, 3]) / 6.0)[y]  # p(y): label frequencies as probabilities
        w = torch.exp(log_qy_zc - log_qy_x)
        expected = w * (log_px + log_pz - log_qy_zc - log_qz) + log_qy_x + log_py
    assert torch.allclose(terms["log_py"], log_py, atol=1e-6)
    assert torch.allclose(terms["log_qy_x"], log_qy_x, atol=1e-5)
    assert torch.allclose(terms["weight"], w, atol=1e-5)
    assert torch.allclose(terms["objective"], expected, atol=1e-4)
    pyro.set_rng_seed(1)
    loss = CCVAE_ELBO()(entry.model, entry.guide)(x, y)  # the loss module the trainer optimises
    assert torch.allclose(loss, -expected.sum(), atol=1e-3)


def test_unlabelled_loss_enumerates_the_categorical_label_exactly():
    entry = _entry()
    entry.set_label_prior(torch.tensor([0, 1, 1, 2]))
    x = torch.rand(5, 1, 8, 8)
    pyro.set_rng_seed(2)
    loss = CCVAE_ELBO().differentiable_loss(entry.model, entry.guide, x)
    pyro.set_rng_seed(2)
    trace = poutine.trace(poutine.block(entry.guide, hide=["y"])).get_trace(x)
    z_c, z_s = trace.nodes["z_c"]["value"], trace.nodes["z_s"]["value"]
    with torch.no_grad():
        loc, scale = entry.guide.encode(x)
        log_qz = _normal(z_c, loc[:, :3], scale[:, :3]) + _normal(z_s, loc[:, 3:], scale[:, 3:])
        log_px = _bernoulli_pixels(x.flatten(1), entry.model.decoder(torch.cat([z_c, z_s], -1)))
        log_pzs = _normal(z_s, torch.zeros_like(z_s), torch.ones_like(z_s))
        log_q_y = (z_c * entry.guide.classifier.weight + entry.guide.classifier.bias).log_softmax(-1)  # [B, K]
        log_py = torch.log(entry.model.y_probs)
        per_class = torch.stack(
            [
                log_py[k] + _normal(z_c, entry.model.prior.loc[k], entry.model.prior.log_scale[k].exp()) - log_q_y[:, k]
                for k in range(3)
            ],
            -1,
        )
        elbo = (log_q_y.exp() * per_class).sum(-1) + log_px + log_pzs - log_qz
    assert torch.allclose(loss, -elbo.sum(), atol=1e-3)


def test_conditional_prior_shapes():
    cat = ConditionalPrior(3, multilabel=False)
    loc, scale = cat(torch.tensor([0, 2, 1, 1]))
    assert loc.shape == scale.shape == (4, 3) and torch.equal(loc[0], torch.tensor([2.0, -2.0, -2.0]))
    loc, _ = cat(torch.arange(3).reshape(3, 1))  # y enumerated: [K, 1] -> [K, 1, K]
    assert loc.shape == (3, 1, 3)
    multi = ConditionalPrior(4, multilabel=True)
    y = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    loc, scale = multi(y)
    assert loc.shape == scale.shape == (2, 4)
    assert torch.equal(loc[0], torch.tensor([-2.0, 2.0, 2.0, -2.0]))
    with torch.no_grad():
        multi.loc[1, 1] = 5.0
    assert multi(y)[0][:, 1].tolist() == [5.0, 5.0]


def test_label_prior_is_the_labelled_frequency_as_probabilities():
    entry = _entry()
    entry.set_label_prior(torch.tensor([0, 0, 0, 1]))
    assert torch.allclose(entry.model.y_probs, torch.tensor([0.75, 0.25, 1e-6]), atol=1e-5)
    multi = _entry(MULTI)
    multi.set_label_prior(torch.tensor([[1.0, 0, 1, 0], [1.0, 0, 0, 0]]))
    assert torch.allclose(multi.model.y_probs, torch.tensor([1 - 1e-3, 1e-3, 0.5, 1e-3]))
    # p(y) scores labels with these probabilities (the reference code squashed them through a sigmoid)
    assert torch.allclose(
        multi.model.label_prior(1).log_prob(torch.tensor([[1.0, 0, 1, 0]])),
        torch.log(torch.tensor([(1 - 1e-3) * (1 - 1e-3) * 0.5 * (1 - 1e-3)])),
    )


@pytest.mark.parametrize("meta", [META, MULTI], ids=["categorical", "attributes"])
def test_every_parameter_gets_a_finite_gradient(meta):
    entry = _entry(meta)
    x = torch.rand(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1, 2]) if meta is META else torch.randint(0, 2, (6, 4)).float()
    entry.set_label_prior(y)
    loss = entry(x, x, y)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in entry.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_labelled_gradient_reaches_the_classifier_through_the_weight_and_q_y_x():
    entry = _entry()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    entry(None, x, y).backward()
    assert entry.guide.classifier.weight.grad.abs().sum() > 0


def test_digits_with_10_labels_per_class_learns_to_classify(tmp_path):
    summary = train(
        tiny_config(
            model="ccvae",
            **{
                "data.labels_per_class": 10,
                "train.epochs": 8,
                "train.batch_size": 64,
                "train.figures": True,
                "options": {"z_style": 8, "hidden": [128], "k": 20},
            },
        ),
        tmp_path / "run",
    )
    assert summary["test_accuracy"] > 0.75  # 100 labels; logistic regression on them: about 0.8 at best
    for name in ("swaps.png", "reconstructions.png"):
        assert (tmp_path / "run" / "figures" / name).stat().st_size > 0
    run = load_run(tmp_path / "run")
    assert run.posterior(run.tensors("test")[0][:5])["y_probs"].shape == (5, 10)


def test_attributes_train_end_to_end_on_a_celeba_folder(tmp_path):
    from test_celeba import write_celeba

    write_celeba(tmp_path / "celeba", parts=[0] * 12 + [1] * 2 + [2] * 4)
    config = tiny_config(
        model="ccvae",
        **{
            "data.name": "celeba",
            "data.data_dir": str(tmp_path),
            "data.image_size": 16,
            "data.attributes": ["Male", "Smiling", "Young"],
            "data.labels_per_class": None,
            "data.label_fraction": 0.5,
            "data.validation": 2,
            "train.epochs": 2,
            "train.batch_size": 4,
            "train.figures": True,
            "options": {"z_style": 3, "hidden": [32], "k": 4, "likelihood": "laplace"},
        },
    )
    summary = train(config, tmp_path / "run")
    assert 0 <= summary["test_accuracy"] <= 1 and len(summary["best"]["test_per_attribute_accuracy"]) == 3
    assert (tmp_path / "run" / "figures" / "walks.png").stat().st_size > 0


class _ReadsTheCode:
    """A judge for a CCVAE whose decoder is replaced by the identity: it reads labels off z_c."""

    def __init__(self, multilabel, entangled=False):
        self.multilabel, self.entangled = multilabel, entangled

    def predict(self, z):
        if not self.multilabel:
            return z[:, :3].argmax(-1)
        if self.entangled:  # every attribute follows z_c[0]: a walk on 0 changes them all
            return (z[:, :1] > 0).long().expand(-1, 4)
        return (z[:, :4] > 0).long()


def _with_identity_decoder(entry):
    entry.decode = lambda z: z  # the "image" is the code itself
    return entry


def test_intervention_accuracy_counts_the_judged_class():
    entry = _with_identity_decoder(_entry(prior_separation=2.0))
    with torch.no_grad():
        entry.model.prior.loc.copy_(2.0 * (2 * torch.eye(3) - 1))
    x = torch.rand(50, 1, 8, 8)
    result = entry.intervention_accuracy(x, _ReadsTheCode(False), batch_size=16)
    assert result == {"intervention_accuracy": 1.0, "per_class": [1.0, 1.0, 1.0]}

    class AlwaysZero:
        def predict(self, z):
            return torch.zeros(z.shape[0], dtype=torch.long)

    result = entry.intervention_accuracy(x, AlwaysZero())
    assert result["per_class"] == [1.0, 0.0, 0.0] and result["intervention_accuracy"] == pytest.approx(1 / 3)


def test_walk_effects_separate_own_and_other_attributes():
    entry = _with_identity_decoder(_entry(MULTI))
    with torch.no_grad():
        entry.model.prior.loc.copy_(torch.tensor([-2.0, 2.0]).expand(4, 2))
    x = torch.rand(40, 1, 8, 8)
    clean = entry.walk_effects(x, _ReadsTheCode(True))
    assert clean["walk_own_change"] == 1.0 and clean["walk_other_change"] == 0.0
    assert entry.intervention_accuracy(x, _ReadsTheCode(True))["per_attribute"] == [1.0] * 4
    tangled = entry.walk_effects(x, _ReadsTheCode(True, entangled=True))
    assert tangled["per_attribute_own"] == [1.0, 0.0, 0.0, 0.0]
    assert tangled["per_attribute_other"][0] == 1.0 and tangled["per_attribute_other"][1:] == [0.0] * 3
    with pytest.raises(ValueError, match="needs binary attributes"):
        _entry().walk_effects(x, _ReadsTheCode(False))


def test_walk_matrix_is_the_identity_for_a_clean_code_and_a_row_for_a_tangled_one():
    entry = _with_identity_decoder(_entry(MULTI))
    with torch.no_grad():
        entry.model.prior.loc.copy_(torch.tensor([-2.0, 2.0]).expand(4, 2))
    x = torch.rand(40, 1, 8, 8)
    assert torch.equal(entry.walk_matrix(x, _ReadsTheCode(True)), torch.eye(4))
    tangled = entry.walk_matrix(x, _ReadsTheCode(True, entangled=True))
    assert tangled[0].tolist() == [1.0] * 4 and tangled[1:].sum() == 0  # walking z_c[0] moves every attribute
    with pytest.raises(ValueError, match="needs binary attributes"):
        _entry().walk_matrix(x, _ReadsTheCode(False))


def test_shapes_attributes_train_end_to_end(tmp_path):
    config = tiny_config(
        model="ccvae",
        **{
            "data.name": "shapes",
            "data.num_examples": 600,
            "data.labels_per_class": None,
            "data.validation": 50,
            "train.epochs": 2,
            "train.batch_size": 50,
            "train.figures": True,
            "options": {"z_style": 3, "hidden": [32], "k": 4, "net": "conv"},
        },
    )
    summary = train(config, tmp_path / "run")
    assert len(summary["best"]["test_per_attribute_accuracy"]) == 5 and summary["seconds"] > 0
    assert (tmp_path / "run" / "figures" / "walks.png").stat().st_size > 0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("likelihood", "gauss", "likelihood must be one of bernoulli, laplace"),
        ("k", 0, "k must be at least 1"),
        ("z_style", -1, "z_style must be at least 0"),
        ("laplace_scale", 0.0, "laplace_scale must be positive"),
    ],
)
def test_bad_options(key, value, message):
    from pyrossl.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        CCVAEOptions(**{key: value})


@pytest.mark.parametrize(
    "recipe", ["ccvae-digits", "ccvae-fmnist", "ccvae-fmnist-1000", "ccvae-shapes", "ccvae-celeba"]
)
def test_recipes_are_valid(recipe):
    from pathlib import Path

    from pyrossl.config import load_config
    from pyrossl.registry import model_class, resolve

    config = resolve(load_config(Path(__file__).resolve().parents[1] / "runs" / f"{recipe}.toml"))
    assert config.model == "ccvae"
    model_class("ccvae").make_options(config.options)


def test_particles_average_independent_estimates_of_both_bounds():
    """train.particles = k is honoured: k draws of q(z|x), for the labelled bound (eq. 4) and the unlabelled one."""
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    entry = _entry()
    one, many = CCVAE_ELBO(num_particles=1), CCVAE_ELBO(num_particles=3)
    for args in ((x,), (x, y)):
        pyro.set_rng_seed(2)
        singles = [one.loss(entry.model, entry.guide, *args) for _ in range(3)]
        pyro.set_rng_seed(2)
        averaged = many.loss(entry.model, entry.guide, *args)
        assert math.isfinite(averaged)
        if len(args) == 2:  # sequential particles: the same draws as three single-particle calls
            assert averaged == pytest.approx(sum(singles) / 3, rel=1e-5)
    from pyrossl.infer.objective import Objective

    built = CCVAE(META, CCVAEOptions(z_style=2, hidden=[16], k=2), objective=Objective(particles=3))
    assert built.elbo.num_particles == 3 and built.elbo.labelled.num_particles == 3
    assert torch.isfinite(built(x, x, y))
