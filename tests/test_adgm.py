import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from common import enumerated_and_by_hand, tiny_config
from pyrossl.errors import ConfigError
from pyrossl.infer.objective import Objective
from pyrossl.models.adgm import ADGM, SDGM, ADGMOptions
from pyrossl.run import load_run
from pyrossl.train import train

META = {"image_shape": (1, 8, 8), "num_classes": 3, "classes": ("a", "b", "c")}
ENTRIES = (ADGM, SDGM)


def _small(cls, z_guide="diag-normal", **options):
    torch.manual_seed(0)
    return cls(META, ADGMOptions(**{"z_dim": 2, "a_dim": 3, "hidden": [16], **options}), "enum", z_guide=z_guide)


@pytest.mark.parametrize("cls", ENTRIES)
@pytest.mark.parametrize("z_guide", ["diag-normal", "flow"])
def test_every_parameter_gets_a_gradient_and_none_is_in_pyros_store(cls, z_guide):
    pyro.clear_param_store()
    model = _small(cls, z_guide)
    x = torch.rand(5, 1, 8, 8)
    loss = model(x, x[:3], torch.tensor([0, 1, 2]))
    assert torch.isfinite(loss)
    loss.backward()
    assert len(pyro.get_param_store()) == 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"model", "guide"}


@pytest.mark.parametrize("cls", ENTRIES)
def test_the_enumerated_bound_is_the_monte_carlo_average_of_its_per_image_estimate(cls):
    """TraceEnum_ELBO sums y out of U(x) with a drawn before y; the per-image estimate writes the sum out
    by hand (one a, one z per class): their averages over draws agree, and both lie below the IWAE bound."""
    model = _small(cls)
    x = torch.rand(4, 1, 8, 8)
    pyro.set_rng_seed(1)
    enumerated, by_hand, se = enumerated_and_by_hand(model, x)
    assert abs(enumerated - by_hand) < 4 * se, (enumerated, by_hand, se)
    iwae = model.log_likelihood(x, 300, batch_size=2)
    assert iwae.shape == (4,) and (by_hand < iwae.sum())


@pytest.mark.parametrize("cls", ENTRIES)
def test_the_classification_term_is_alpha_times_the_cross_entropy_of_q_y_given_the_drawn_a(cls):
    """Labelled loss with aux_weight = alpha minus with 0 (same draws) is alpha * sum_n -log q(y_n|a_n, x_n),
    a_n the draw the labelled bound uses: the first sample of the guide."""
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = {}
    for alpha in (0.0, 7.0):
        model = _small(cls, aux_weight=alpha)
        pyro.set_rng_seed(1)
        losses[alpha] = model.elbo.loss(model.model, model.guide, x, y)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        a = dist.Normal(*model.guide.a_params(x)).rsample()
        logits = model.guide.classify_given(x, a)
    cross_entropy = torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
    assert losses[7.0] - losses[0.0] == pytest.approx(7.0 * cross_entropy, rel=1e-4)


@pytest.mark.parametrize("cls", ENTRIES)
def test_the_labelled_bound_is_the_monte_carlo_log_weight_of_the_joint(cls):
    """-L(x, y) with aux_weight 0 is -(log p(x, y, z, a) - log q(a|x) - log q(z|a, y, x)) of one draw:
    Trace_ELBO's value equals the importance log-weight of the same draw (every term Monte Carlo)."""
    from pyrossl.infer.iwae import importance_log_weights

    model = _small(cls, aux_weight=0.0)
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    pyro.set_rng_seed(3)
    loss = model.elbo.loss(model.model, model.guide, x, y)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        log_w = importance_log_weights(model.model, model.guide, x, y, num_samples=1)
    assert loss == pytest.approx(-log_w.sum().item(), rel=1e-5)


@pytest.mark.parametrize("cls", ENTRIES)
def test_prediction_averages_fixed_draws_of_a_and_leaves_the_random_state_alone(cls):
    model = _small(cls, eval_samples=7)
    x = torch.rand(9, 1, 8, 8)
    state = torch.get_rng_state()
    logits = model.class_logits(x)
    assert torch.equal(torch.get_rng_state(), state)
    # no dependence on the batch an image is in (up to the rounding of a smaller matrix product)
    assert torch.allclose(logits[4:], model.class_logits(x[4:], batch_size=2), atol=1e-6)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(9))
    # the mean of q(y|a, x) over the guide's seven fixed draws of a
    loc, scale = model.guide.a_params(x)
    eps = torch.randn((7, 1, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = torch.softmax(model.guide.classify_given(x, loc + scale * eps), -1).mean(0)
    assert torch.allclose(logits.exp(), probs, atol=1e-6)
    assert model.predict(x).shape == (9,)


@pytest.mark.parametrize("cls", ENTRIES)
def test_inspection_shapes_and_the_generative_posterior(cls):
    model = _small(cls)
    x = torch.rand(6, 1, 8, 8)
    post = model.posterior(x)
    assert post["a_loc"].shape == (6, 3) and post["z_loc"].shape == (6, 2) and (post["a_scale"] > 0).all()
    assert model.latent(x).shape == (6, 2) and model.reconstruct(x).shape == x.shape
    assert model.sample(4, torch.tensor([0, 1, 2, 0])).shape == (4, 1, 8, 8)
    assert model.class_conditional_samples(columns=5).shape == (15, 1, 8, 8)
    torch.manual_seed(1)
    joint = model.class_log_joint(x, 20, batch_size=4)
    torch.manual_seed(1)
    assert torch.allclose(model.generative_posterior(x, 20, batch_size=4), joint.softmax(-1))


def test_the_skip_model_draws_a_above_x_and_decodes_from_it():
    """SDGM: a ~ p(a|y, z) is sampled before x and x depends on it; ADGM: a ~ p(a|x, y, z) after x."""
    for cls, order in ((SDGM, ["y", "z", "a", "x"]), (ADGM, ["y", "z", "x", "a"])):
        model = _small(cls)
        trace = poutine.trace(model.model).get_trace(num=4)
        assert [n for n, s in trace.nodes.items() if s["type"] == "sample" and n != "data"] == order
    model = _small(SDGM)
    y, z = model.one_hot(torch.tensor([0, 1])), torch.zeros(2, 2)
    assert not torch.allclose(model.decode(y, z, torch.zeros(2, 3)), model.decode(y, z, 3 * torch.ones(2, 3)))


def test_particles_are_vectorised_over_the_enumerated_label():
    model = ADGM(META, ADGMOptions(z_dim=2, a_dim=3, hidden=[16]), "enum", objective=Objective("elbo", 3))
    x = torch.rand(5, 1, 8, 8)
    assert torch.isfinite(model(x, x[:2], torch.tensor([0, 1])))
    assert model.elbo.unlabelled.num_particles == model.elbo.labelled.num_particles == 3


@pytest.mark.parametrize(
    "options, message",
    [
        ({"a_dim": 0}, "a_dim"),
        ({"eval_samples": 0}, "eval_samples"),
        ({"aux_weight": -1.0}, "aux_weight"),
        ({"net": "resnet"}, "net"),
    ],
)
def test_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        ADGMOptions(**options)


def test_iwae_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="enumerated"):
        train(tiny_config(model="adgm", **{"train.objective": "iwae", "data.labels_per_class": 5}), tmp_path / "run")


@pytest.mark.parametrize("name", ["adgm", "sdgm"])
def test_trains_from_a_recipe_and_load_run_gives_the_same_predictions(tmp_path, name):
    config = tiny_config(
        model=name,
        **{
            "data.labels_per_class": 5,
            "train.epochs": 2,
            "train.figures": True,
            "options": {"z_dim": 3, "a_dim": 3, "hidden": [32], "eval_samples": 4},
        },
    )
    summary = train(config, tmp_path / "run")
    assert 0 <= summary["test_accuracy"] <= 1
    run = load_run(tmp_path / "run", which="last")
    x, y = run.tensors("test")
    assert torch.equal(run.predict(x), run.model.predict(x))
    assert run.model.evaluate(x, y)["accuracy"] == pytest.approx(summary["last"]["test_accuracy"])
    for figure in ("class_samples", "confusion", "reconstructions", "latent_tsne"):
        assert (tmp_path / "run" / "figures" / f"{figure}.png").stat().st_size > 0


def test_pyrossl_ablate_crosses_the_z_guides_with_batch_norm(tmp_path, capsys):
    import csv

    from pyrossl import cli

    recipe = tmp_path / "sdgm.toml"
    recipe.write_text(
        'model = "sdgm"\n[data]\nname = "digits"\nlabels_per_class = 5\nvalidation = 0.1\ntest = 0.2\n'
        "[train]\nepochs = 1\nprogress = false\nfigures = false\n"
        "[options]\nz_dim = 3\na_dim = 2\nhidden = [16]\n"
    )
    args = ["ablate", str(recipe), "--z-guides", "diag-normal,flow", "--vary", "options.batch_norm=false,true"]
    assert cli.main(args + ["--seeds", "0", "--out", str(tmp_path / "ablation")]) == 0
    rows = list(csv.DictReader((tmp_path / "ablation" / "ablation.csv").open()))
    assert len(rows) == 4 and all(0 <= float(r["test_accuracy"]) <= 1 for r in rows), rows
    assert "z_guide=flow" in capsys.readouterr().out
