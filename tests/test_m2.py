import json
import math
from pathlib import Path

import pytest
import torch

from common import one_checked_step, tiny_config
from pyrossl.models.m2 import M2, M2Options
from pyrossl.run import load_run
from pyrossl.train import train

ROOT = Path(__file__).resolve().parents[1]

META = {"image_shape": (1, 8, 8), "num_classes": 3, "classes": ("a", "b", "c")}


def test_parameters_live_in_the_module():
    import pyro

    model = M2(META, M2Options(z_dim=2, hidden=[16]), "enum")
    model(torch.rand(4, 1, 8, 8)).backward()
    assert len(pyro.get_param_store()) == 0
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"model", "guide"}


def test_inspection_shapes():
    model = M2(META, M2Options(z_dim=2, hidden=[16]), "gumbel")
    x = torch.rand(6, 1, 8, 8)
    assert model.predict(x).shape == (6,) and torch.allclose(model.predict_proba(x).sum(-1), torch.ones(6))
    assert model.latent(x).shape == (6, 2) and model.reconstruct(x).shape == x.shape
    assert model.sample(4, torch.tensor([0, 1, 2, 0])).shape == (4, 1, 8, 8)
    grid = model.class_conditional_samples(columns=5)
    assert grid.shape == (15, 1, 8, 8)


def test_log_likelihood_sums_classes_exactly():
    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16]), "enum")
    x = torch.rand(5, 1, 8, 8)
    ll = model.log_likelihood(x, 200, batch_size=2)
    assert ll.shape == (5,) and torch.isfinite(ll).all()
    with torch.no_grad():
        elbo = (
            torch.tensor(
                [
                    -model.elbo.unlabelled.loss(model.model, model.guide, x[i : i + 1])
                    for i in range(5)
                    for _ in range(200)
                ]
            )
            .reshape(5, 200)
            .mean(1)
        )
    assert (ll > elbo - 0.5).all()  # an IWAE bound with 200 samples sits above the ELBO


def _digits_config(model, guide, **extra):
    return tiny_config(
        model=model,
        guide=guide,
        **{
            "data.labels_per_class": 3,
            "train.epochs": 30,
            "train.batch_size": 64,
            "train.labelled_batch_size": 50,
            "options": {"hidden": [64]} if model == "classifier" else {"hidden": [64], "z_dim": 8, "aux_weight": 10.0},
            **extra,
        },
    )


def test_m2_beats_the_supervised_only_baseline_on_digits(tmp_path):
    """Same 30 labels, same classifier network: the unlabelled digits must help."""
    m2 = train(_digits_config("m2", "enum", **{"train.figures": True}), tmp_path / "m2")
    # the baseline sees only labelled batches: give it the same number of steps and more
    baseline = train(_digits_config("classifier", "none", **{"train.epochs": 1000}), tmp_path / "clf")
    assert m2["steps"] <= baseline["steps"]
    # measured on CPU: M2 0.841 / 0.852, baseline 0.760 / 0.774 after 1000 steps (seeds 0 / 1)
    assert m2["test_accuracy"] > baseline["test_accuracy"] + 0.05, (m2["test_accuracy"], baseline["test_accuracy"])
    assert m2["test_accuracy"] > 0.8
    for name in ("class_samples", "latent_pca", "latent_tsne", "confusion"):
        assert (tmp_path / "m2" / "figures" / f"{name}.png").stat().st_size > 0


def test_z_kl_weight_scales_the_z_term_only():
    """Labelled loss with beta = 3 minus with beta = 1 (same noise) is 2 KL(q(z|x,y) || N(0, I))."""
    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16]), "enum")
    x, y = torch.rand(4, 1, 8, 8), model.one_hot(torch.tensor([0, 1, 2, 0]))
    losses = {}
    for beta in (1.0, 3.0):
        model.model.z_kl_weight = model.guide.z_kl_weight = beta
        torch.manual_seed(1)
        losses[beta] = model.elbo.labelled.loss(model.model, model.guide, x, y)
    loc, scale = model.guide.z_encoder(x, y)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(loc, scale), torch.distributions.Normal(0.0, 1.0)
    ).sum()
    assert losses[3.0] - losses[1.0] == pytest.approx(2 * kl.item(), rel=1e-4)
    built = M2(META, M2Options(z_dim=2, hidden=[16], z_kl_weight=4.0), "gumbel")
    assert built.model.z_kl_weight == built.guide.z_kl_weight == 4.0


def test_generative_posterior_is_bayes_rule_on_the_class_joints():
    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16]), "enum")
    x = torch.rand(5, 1, 8, 8)
    torch.manual_seed(1)
    joint = model.class_log_joint(x, 50, batch_size=2)
    assert joint.shape == (5, 3) and torch.isfinite(joint).all()
    torch.manual_seed(1)
    assert torch.allclose(model.generative_posterior(x, 50, batch_size=2), joint.softmax(-1))
    torch.manual_seed(1)
    assert torch.allclose(model.log_likelihood(x, 50, batch_size=2), joint.logsumexp(-1))
    # a decoder that ignores z, with q(z|x, y) = p(z): the estimate is exact, p(y|x) is Bayes's rule on p(x|y)
    with torch.no_grad():
        model.model.decoder.from_z.weight.zero_()
        model.model.decoder.from_y.weight.mul_(20.0)  # classes that differ clearly
    model.guide.z_encoder = _Prior(2)
    eye = torch.eye(3)
    with torch.no_grad():
        logits = model.model.decoder(eye, torch.zeros(3, 2))  # [K, pixels]
        log_px = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits.unsqueeze(0).expand(5, -1, -1), x.flatten(1).unsqueeze(1).expand(-1, 3, -1), reduction="none"
        ).sum(-1)
    post = model.generative_posterior(x, 7)
    assert torch.allclose(post, log_px.softmax(-1), atol=1e-5)
    assert post.max() > 0.9  # not the uniform prior


class _Prior(torch.nn.Module):
    """q(z|x, y) = N(0, I) whatever x and y."""

    def __init__(self, z_dim):
        super().__init__()
        self.z_dim = z_dim

    def forward(self, x, y):
        loc = torch.zeros(*y.shape[:-1], self.z_dim)
        return loc, torch.ones_like(loc)

    def distribution(self, x, y):
        import pyro.distributions as dist

        return dist.Normal(*self(x, y)).to_event(1)


# --- the simplex-latent guides (alpha a latent of the model) -------------------------------------

LATENT_GUIDES = ["dirichlet", "logistic-normal-latent"]


def test_options_check_the_dirichlet_concentration():
    from pyrossl.errors import ConfigError

    assert M2Options().dirichlet_concentration == 1.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="options.dirichlet_concentration must be positive"):
            M2Options(dirichlet_concentration=bad)
    assert set(LATENT_GUIDES) <= set(M2.guides)


def _inverse_softplus(v):
    import math

    return math.log(math.expm1(v))


@pytest.mark.parametrize("guide", LATENT_GUIDES)
def test_simplex_latent_likelihoods_are_exact_where_q_is_the_prior(guide):
    """A decoder that ignores alpha and z, and q(alpha|x) q(z|x, alpha) = p(alpha) p(z): every importance
    weight of log p(x) is p(x|.) itself, and p(x, y) = p(x|.) E_p[alpha_y] = p(x|.) / K by symmetry."""
    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16], sigma=1 - 1e-4), guide)
    classifier_out = [m for m in model.guide.classifier.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        model.model.decoder.from_z.weight.zero_()
        model.model.decoder.from_y.weight.zero_()
        model.guide.z_encoder.loc.weight.zero_()
        model.guide.z_encoder.loc.bias.zero_()
        model.guide.z_encoder.scale.weight.zero_()
        model.guide.z_encoder.scale.bias.fill_(_inverse_softplus(1 - 1e-4))  # softplus(.) + 1e-4 = 1
        classifier_out.weight.zero_()
        # dirichlet: softplus(logit) + 0.01 = 1, the prior's Dirichlet(1, 1, 1); logistic-normal-latent: N(0, I)
        classifier_out.bias.fill_(_inverse_softplus(1 - model.guide.floor) if guide == "dirichlet" else 0.0)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        logits = model.model.decoder(torch.eye(3)[:1], torch.zeros(1, 2)).expand(5, -1)
        log_px = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none").sum(-1)
    assert torch.allclose(model.log_likelihood(x, 7, batch_size=2), log_px, atol=1e-3)
    torch.manual_seed(1)
    joint = model.class_log_joint(x, 4000, batch_size=5)
    assert torch.allclose(joint, log_px[:, None] - torch.log(torch.tensor(3.0)), atol=0.05), joint - log_px[:, None]
    torch.manual_seed(1)
    assert torch.allclose(model.generative_posterior(x, 4000, batch_size=5), torch.full((5, 3), 1 / 3), atol=0.02)


@pytest.mark.parametrize("guide", LATENT_GUIDES)
def test_simplex_latent_class_joint_agrees_with_the_likelihood(guide):
    """sum_y p(x, y) = p(x) (sum_y alpha_y = 1): two IWAE estimates of log p(x) of an untrained model."""
    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16]), guide)
    x = torch.rand(4, 1, 8, 8)
    ll = model.log_likelihood(x, 2000)
    assert torch.allclose(model.class_log_joint(x, 2000).logsumexp(-1), ll, atol=0.3)


def _iwae_config(guide, **train):
    from pyrossl.config import load_config

    return load_config(
        base={
            "model": "m2",
            "guide": guide,
            "train": {"objective": "iwae", **train},
            "options": {"z_dim": 2, "hidden": [16]},
        }
    )


@pytest.mark.parametrize("guide", LATENT_GUIDES)
def test_iwae_trains_the_simplex_latent_guides(guide):
    from pyrossl.infer.objective import IWAE_ELBO
    from pyrossl.registry import build_model

    torch.manual_seed(0)
    model = build_model(_iwae_config(guide, particles=4), META)
    assert isinstance(model.elbo.unlabelled, IWAE_ELBO) and isinstance(model.elbo.labelled, IWAE_ELBO)
    assert model.elbo.unlabelled.num_particles == 4
    x, y = torch.rand(8, 1, 8, 8), torch.randint(3, (8,))
    one_checked_step(model, x, x[:4], y[:4])
    assert torch.isfinite(model(x, x[:4], y[:4]))


@pytest.mark.parametrize("guide", ["enum", "gumbel", "st-gumbel", "logistic-normal", "sample"])
def test_iwae_is_refused_for_the_other_guides(guide):
    from pyrossl.errors import ConfigError
    from pyrossl.registry import build_model

    with pytest.raises(ConfigError) as error:
        build_model(_iwae_config(guide), META)
    message = str(error.value)
    assert "\n" not in message and f"'{guide}'" in message
    assert "dirichlet" in message and "logistic-normal-latent" in message


@pytest.mark.parametrize("guide", LATENT_GUIDES)
def test_cli_trains_and_load_run_reloads_the_simplex_latent_guides(guide, tmp_path, capsys):
    from pyrossl.cli import main
    from pyrossl.run import load_run

    recipe = tmp_path / "m2.toml"
    recipe.write_text(
        f'model = "m2"\nguide = "{guide}"\n[data]\nname = "digits"\nlabels_per_class = 3\n'
        "[train]\nepochs = 2\nbatch_size = 256\nprogress = false\n[options]\nz_dim = 4\nhidden = [32]\n"
    )
    code = main(["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    run = load_run(tmp_path / "run", which="last")
    assert run.config.guide == guide and run.model.guide.label_latent == run.model.model.label_latent
    x, y = run.tensors("test")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["guide"] == guide and summary["epochs"] == 2
    assert (run.predict(x) == y).float().mean().item() == pytest.approx(summary["last"]["test_accuracy"], abs=1e-6)
    post = run.posterior(x[:5])
    assert post["y_probs"].shape == (5, 10) and torch.isfinite(post["z_loc"]).all()
    assert run.sample(3, y=2).shape == (3, 1, 8, 8)
    assert torch.isfinite(run.model.log_likelihood(x[:4], 5)).all()


def test_the_demo_decodes_the_class_it_is_given(tmp_path):
    """The demo's first picture must show what M2 is: each row of class_samples.png its own class.

    The trained q(y|x) classifies the class-conditional samples as the class they were decoded from
    (0.81 after 4 epochs with the recipe's z_kl_weight = 4; 0.46 with 1, when the decoder ignores y)."""
    from pyrossl.config import load_config
    from pyrossl.train import train

    train(load_config(ROOT / "runs" / "demo.toml", ["train.epochs=4", "train.progress=false"]), tmp_path / "demo")
    run = load_run(tmp_path / "demo", which="last")
    torch.manual_seed(0)
    samples = run.model.class_conditional_samples(columns=20)
    rows = torch.arange(10).repeat_interleave(20)
    assert (run.model.predict(samples) == rows).float().mean() >= 0.7
    assert (tmp_path / "demo" / "figures" / "class_samples.png").stat().st_size > 0


def test_the_model_takes_a_guide_whose_q_of_z_ignores_y():
    """M2's decoder broadcasts an enumerated y [K, 1] (one-hot [K, 1, K]) against a z drawn once for all
    classes [n, d]."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer import Trace_ELBO, TraceEnum_ELBO

    from pyrossl.models.m2 import M2Model

    model = M2Model((1, 8, 8), 3, z_dim=2, hidden=[16])
    classifier, encoder = torch.nn.Linear(64, 3), torch.nn.Linear(64, 4)

    def guide_of_z_given_x(x, y=None):
        with pyro.plate("data", x.shape[0]):
            if y is None:
                pyro.sample("y", dist.Categorical(logits=classifier(x.flatten(1))), infer={"enumerate": "parallel"})
            loc, log_scale = encoder(x.flatten(1)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    x = torch.rand(5, 1, 8, 8)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide_of_z_given_x, x)
    labelled = Trace_ELBO(max_plate_nesting=1).loss(model, guide_of_z_given_x, x, torch.tensor([0, 1, 2, 0, 1]))
    assert math.isfinite(loss) and math.isfinite(labelled)


def test_the_auxiliary_term_is_alpha_times_the_classifiers_cross_entropy():
    """The labelled loss with aux_weight = a minus with 0 (same draws) is a * sum_n -log q(y_n|x_n)."""
    import pyro

    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = {}
    for alpha in (0.0, 7.0):
        torch.manual_seed(0)
        model = M2(META, M2Options(z_dim=2, hidden=[16], aux_weight=alpha), "enum")
        pyro.set_rng_seed(1)
        losses[alpha] = model.elbo.loss(model.model, model.guide, x, y)
    cross_entropy = torch.nn.functional.cross_entropy(model.guide.classifier(x), y, reduction="sum").item()
    assert losses[7.0] - losses[0.0] == pytest.approx(7.0 * cross_entropy, rel=1e-4)


@pytest.mark.parametrize("guide", ["enum", "gumbel", "dirichlet"])
def test_the_guides_elbo_estimate_lies_below_the_iwae_bound(guide):
    """sum_y q(y|x) L(x, y) + H(q(y|x)) (a simplex-latent guide: its own model's ELBO), averaged over draws of z,
    is at most log p(x), which the IWAE bound with 200 samples approaches from below."""
    import pyro

    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16]), guide)
    x = torch.rand(6, 1, 8, 8)
    pyro.set_rng_seed(1)
    elbo = torch.stack([model.elbo_estimate(x) for _ in range(50)]).mean(0)
    iwae = model.log_likelihood(x, 200)
    assert elbo.shape == iwae.shape == (6,) and (elbo < iwae + 0.05).all(), (elbo, iwae)


def test_infer_discrete_decodes_the_label_site_as_the_exact_map_class():
    """y is a Categorical site of class indices: Pyro's infer_discrete at temperature 0, z held at the
    guide's draw, gives argmax_y log p(y) + log p(x|y, z), computed here class by class."""
    from pyro import poutine
    from pyro.infer import config_enumerate, infer_discrete

    from pyrossl.infer.params import module_local
    from pyrossl.nn import pixel_likelihood

    torch.manual_seed(0)
    model = M2(META, M2Options(z_dim=2, hidden=[16]), "enum")
    x = torch.rand(7, 1, 8, 8).round()
    with torch.no_grad(), module_local():
        z = poutine.trace(model.guide).get_trace(x, torch.zeros(7, dtype=torch.long)).nodes["z"]["value"]
        conditioned = config_enumerate(poutine.condition(model.model, data={"z": z}), "parallel")
        decoded = poutine.trace(infer_discrete(conditioned, first_available_dim=-2, temperature=0)).get_trace(x)
        # the prior is uniform: the MAP class maximises log p(x|y, z) alone
        scores = torch.stack(
            [
                pixel_likelihood(model.model.decoder(model.one_hot(torch.full((7,), c)), z)).log_prob(x.flatten(1))
                for c in range(3)
            ],
            -1,
        )
    assert decoded.nodes["y"]["value"].dtype == torch.long
    assert torch.equal(decoded.nodes["y"]["value"], scores.argmax(-1))


def test_a_guide_that_puts_vectors_at_an_index_label_site_is_told_so():
    import pyro
    import pyro.distributions as dist
    from pyro.infer import TraceEnum_ELBO

    from pyrossl.models.m2 import M2Model

    model = M2Model((1, 8, 8), 3, z_dim=2, hidden=[16])

    def one_hot_guide(x, y=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.OneHotCategorical(logits=torch.zeros(x.shape[0], 3)), infer={"enumerate": "parallel"})
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))

    with pytest.raises(ValueError, match="holds class indices"):
        TraceEnum_ELBO(max_plate_nesting=1).loss(model, one_hot_guide, torch.rand(4, 1, 8, 8))
