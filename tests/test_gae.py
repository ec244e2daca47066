from pathlib import Path

import pyro
import pytest
import torch

from common import tiny_config
from pyrossl.config import load_config
from pyrossl.errors import ConfigError
from pyrossl.models.gae import GAE, GAEOptions, class_pairs, latent_interpolation
from pyrossl.registry import resolve
from pyrossl.run import load_run
from pyrossl.train import train

META = {"image_shape": (1, 8, 8), "num_classes": 3, "classes": ("a", "b", "c")}


def _gae_config(**overrides):
    settings = {
        "model": "gae",
        "data.labels_per_class": None,
        "train.epochs": 12,
        "train.batch_size": 64,
        "train.lr": 3e-3,
        "options": {"z_dim": 6, "hidden": [64], "components": 2},
    }
    settings.update(overrides)
    return tiny_config(**settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("gae")
    summary = train(_gae_config(**{"train.figures": True}), out)
    return out, summary


def test_the_elbo_of_the_point_guide_is_the_reconstruction_log_likelihood():
    torch.manual_seed(0)
    model = GAE(META, GAEOptions(z_dim=3, hidden=[16], components=2))
    x = torch.rand(5, 1, 8, 8)
    logits = model.loss.model.decoder(model.encoder(x))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="sum") / 5
    loss = model(x)
    assert torch.allclose(loss, bce)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert len(pyro.get_param_store()) == 0


def test_training_classifies_digits_and_writes_the_figures(trained):
    out, summary = trained
    best = summary["best"]
    assert best["test_accuracy"] > 0.85  # digits, all training labels for the mixtures
    assert 0 <= best["test_novelty_rate"] < 0.1
    assert best["test_single_mixture_cluster_accuracy"] > 0.4  # no labels at all
    for name in ("class_samples", "styles", "interpolation", "confusion", "reconstructions"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 0


def test_samples_of_a_class_are_classified_as_that_class(trained):
    run = load_run(trained[0])
    k = run.model.meta["num_classes"]
    g = torch.Generator().manual_seed(1)
    y = torch.arange(k).repeat_interleave(30)
    images = run.model.sample(len(y), y, generator=g)
    assert images.shape == (len(y), 1, 8, 8) and ((images >= 0) & (images <= 1)).all()
    assert (run.predict(images) == y).double().mean() > 0.8
    styles = run.model.sample_styles(3, columns=4, generator=g)
    assert styles.shape == (2 * 4, 1, 8, 8)  # two components, four samples each


def test_novelty_rejects_other_images_and_keeps_the_test_set(trained):
    run = load_run(trained[0])
    x, _ = run.tensors("test")
    assert run.model.is_novel(x).double().mean() < 0.1
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(200, 1, 8, 8, generator=g) < 0.5).float()  # salt and pepper: like no digit
    assert run.model.is_novel(noise).double().mean() > 0.9


def test_load_run_restores_the_fitted_mixtures_exactly(trained):
    out, summary = trained
    run = load_run(out)
    x, y = run.tensors("test")
    assert (run.predict(x) == y).double().mean().item() == pytest.approx(summary["best"]["test_accuracy"])
    proba = run.model.predict_proba(x)
    assert torch.allclose(proba.sum(-1), torch.ones(len(x)))


def test_mixtures_are_fitted_only_before_an_evaluation():
    model = GAE(META, GAEOptions(z_dim=3, hidden=[16], components=2))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, 1, 8, 8, generator=g), torch.arange(3).repeat(10)
    data = lambda: {"x": x, "x_labelled": x, "y_labelled": y}  # noqa: E731
    assert model.end_epoch(1, data, evaluating=False) == {}
    with pytest.raises(RuntimeError, match="not fitted"):
        model.predict(x)
    assert "mixture_seconds" in model.end_epoch(2, data, evaluating=True)
    assert model.predict(x).shape == (30,)
    assert model.cluster(x).max() < 3


def test_without_labels_it_says_what_to_set(tmp_path):
    with pytest.raises(ConfigError, match="labels_per_class"):
        train(_gae_config(**{"data.labels_per_class": 0, "train.epochs": 1}), tmp_path)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="covariance"):
        GAEOptions(covariance="banded")
    with pytest.raises(ConfigError, match="components"):
        GAEOptions(components=0)
    with pytest.raises(ConfigError, match="novelty_quantile"):
        GAEOptions(novelty_quantile=-0.1)


def test_interpolation_runs_between_the_two_images():
    torch.manual_seed(0)
    model = GAE(META, GAEOptions(z_dim=3, hidden=[16], components=2))
    xa, xb = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    path = latent_interpolation(model, xa, xb, steps=5)
    assert path.shape == (5, 1, 8, 8)
    assert torch.allclose(path[0], model.reconstruct(xa)[0]) and torch.allclose(path[-1], model.reconstruct(xb)[0])
    assert class_pairs(torch.tensor([2, 0, 1, 0, 2]), 3) == [(1, 2), (2, 0)]


@pytest.mark.parametrize("recipe", ["runs/gae-fmnist.toml", "runs/gae-mnist5k.toml"])
def test_recipes_are_valid(recipe):
    config = resolve(load_config(Path(__file__).parent.parent / recipe))
    assert config.model == "gae" and config.options["components"] >= 1
