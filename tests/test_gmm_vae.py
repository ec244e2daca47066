import json
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal

from common import tiny_config
from pyrossl.config import load_config
from pyrossl.errors import ConfigError
from pyrossl.models.gmm_vae import GMMVAE, GMMVAEOptions
from pyrossl.runs import read_metrics
from pyrossl.train import train

ROOT = Path(__file__).resolve().parents[1]
META = {"image_shape": (1, 8, 8), "num_classes": 3, "classes": ("a", "b", "c"), "num_examples": 40}


def _fake_encode_data(x, index):
    return lambda: {"x": x, "index": index, "x_labelled": x[:0], "y_labelled": torch.zeros(0, dtype=torch.long)}


# --- Serket mode -------------------------------------------------------------------------------
@pytest.mark.parametrize("covariance,kl_weight", [("full", 1.0), ("diag", 1.0), ("full", 2.5)])
def test_the_enumerated_loss_sums_the_cluster_out_exactly(covariance, kl_weight):
    torch.manual_seed(0)
    model = GMMVAE(
        META,
        GMMVAEOptions(z_dim=2, hidden=[16], clusters=3, warmup_epochs=0, covariance=covariance, kl_weight=kl_weight),
    )
    p = model.prior
    tril = torch.tensor([[[0.5, 0.0], [0.3, 2.0]], [[1.0, 0.0], [-0.4, 1.0]], [[0.3, 0.0], [0.1, 0.7]]])
    if covariance == "diag":
        tril = torch.diag_embed(torch.diagonal(tril, dim1=-2, dim2=-1))
    with torch.no_grad():
        p.logits.copy_(torch.tensor([0.2, -0.5, 1.0]))
        p.set_scale_tril(tril)
    assert torch.allclose(p.scale_tril, tril, atol=1e-5)
    x = torch.rand(7, 1, 8, 8)
    torch.manual_seed(3)
    loss = model(x) * 7
    torch.manual_seed(3)
    loc, scale = model.guide.encode(x)
    z = loc + scale * torch.randn_like(loc)  # the guide's reparameterised draw, same noise
    comps = torch.distributions.MultivariateNormal(p.loc, scale_tril=tril)
    log_pz = (p.logits.log_softmax(-1) + comps.log_prob(z[:, None])).logsumexp(-1)
    log_px = -torch.nn.functional.binary_cross_entropy_with_logits(
        model.decoder(z), x.flatten(1), reduction="none"
    ).sum(-1)
    log_q = Normal(loc, scale).log_prob(z).sum(-1)
    # kl_weight multiplies the whole log sum_c p(c) p(z|c), not each component inside the sum
    expected = -(log_px + kl_weight * (log_pz - log_q)).sum()
    assert torch.allclose(loss, expected, rtol=1e-5)
    # the ELBO reported by evaluate is the true bound (weight 1), whatever the training weight
    torch.manual_seed(3)
    elbo = model.evaluate(x, torch.zeros(7, dtype=torch.long))["elbo"]
    assert elbo * 7 == pytest.approx((log_px + log_pz - log_q).sum().item(), rel=1e-5)
    assert model.guide.kl_weight == model.prior.kl_weight == kl_weight  # evaluation leaves the training weight
    probs = model.cluster_probs(z)
    assert torch.allclose(probs.sum(-1), torch.ones(7)) and model.cluster(x).shape == (7,)


def test_the_warm_up_is_a_plain_vae_then_a_fitted_mixture_prior():
    torch.manual_seed(0)
    model = GMMVAE(META, GMMVAEOptions(z_dim=2, hidden=[16], clusters=3, warmup_epochs=2, n_init=2))
    assert not model.prior.mixture
    x = torch.rand(40, 1, 8, 8)
    assert torch.isfinite(model(x))
    assert model.end_epoch(1, _fake_encode_data(x, torch.arange(40))) == {} and not model.prior.mixture
    log = model.end_epoch(2, _fake_encode_data(x, torch.arange(40)))
    assert model.prior.mixture and "warmup_gmm_mean_log_likelihood" in log
    loc, scale = model.guide.encode(x)
    # the prior starts as the mixture EM fitted to samples of q(z|x): an M-step leaves the mixture's
    # mean equal to the samples' mean, which is within a few standard errors of the codes' mean
    pi = model.prior.logits.softmax(-1)
    overall = (pi[:, None] * model.prior.loc).sum(0)
    assert torch.allclose(overall, loc.mean(0), atol=4 * scale.max().item() / 40**0.5 + 1e-3)
    assert (model.prior.scale_tril.diagonal(dim1=-2, dim2=-1) > 0).all()
    assert model.end_epoch(3, _fake_encode_data(x, torch.arange(40))) == {}
    state = model.state_dict()
    again = GMMVAE(META, GMMVAEOptions(z_dim=2, hidden=[16], clusters=3, warmup_epochs=2))
    assert not again.prior.mixture
    again.load_state_dict(state)
    assert again.prior.mixture  # the checkpoint knows the warm-up is over
    assert model.log_likelihood(x[:5], 20).shape == (5,)


def test_gmm_vae_trains_from_a_recipe_and_resumes(tmp_path):
    config = tiny_config(
        model="gmm-vae",
        **{
            "data.validation": 0.2,
            "data.test": 0.2,
            "train.epochs": 4,
            "options": {"z_dim": 3, "hidden": [32], "clusters": 10, "warmup_epochs": 2, "n_init": 1},
        },
    )
    summary = train(config, tmp_path / "a")
    assert {"test_cluster_accuracy", "test_nmi", "test_ari", "test_greedy_cluster_accuracy"} <= set(summary["last"])
    assert "train_cluster_accuracy" in summary["last"]
    records = read_metrics(tmp_path / "a")
    assert "val_cluster_accuracy" not in records[0] and "val_cluster_accuracy" in records[-1]
    # stopped after epoch 2 (the end of the warm-up), resumed: the same numbers
    short = tiny_config(
        model="gmm-vae", **{"data.validation": 0.2, "data.test": 0.2, "train.epochs": 2, "options": config.options}
    )
    train(short, tmp_path / "b")
    (tmp_path / "b" / "config.toml").write_text((tmp_path / "a" / "config.toml").read_text())
    resumed = train(config, tmp_path / "b", resume=True)
    assert resumed["last"]["test_cluster_accuracy"] == summary["last"]["test_cluster_accuracy"]
    assert resumed["last"]["test_elbo"] == pytest.approx(summary["last"]["test_elbo"], rel=1e-6)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["model"] == "gmm-vae"


@pytest.mark.parametrize(
    "bad", [{"kl_weight": 0.0}, {"covariance": "spherical"}, {"clusters": 1}, {"warmup_epochs": -1}]
)
def test_gmm_vae_options_are_checked(bad):
    with pytest.raises(ConfigError):
        GMMVAEOptions(**bad)


def test_gmm_vae_recipes_load():
    for name in ("gmm-vae-mnist3000", "gmm-vae-fmnist"):
        c = load_config(str(ROOT / f"runs/{name}.toml"))
        assert c.model == "gmm-vae" and c.options["clusters"] == 10
