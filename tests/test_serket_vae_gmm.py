from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from common import tiny_config
from pyrossl.config import load_config
from pyrossl.errors import ConfigError
from pyrossl.evaluate import cluster_accuracy
from pyrossl.models.serket_vae_gmm import SerketOptions, SerketVAEGMM
from pyrossl.run import load_run
from pyrossl.runs import read_metrics
from pyrossl.train import train

ROOT = Path(__file__).resolve().parents[1]
META = {"image_shape": (1, 8, 8), "num_classes": 3, "classes": ("a", "b", "c"), "num_examples": 40}


def _serket_config(**overrides):
    settings = {
        "model": "serket-vae-gmm",
        "data.validation": 0,
        "data.test": 0,
        "data.limit_per_class": 30,
        "data.split_seed": 0,
        "train.epochs": 20,
        "train.batch_size": 50,
        "train.lr": 1e-2,
        "train.eval_every": 10,
        "options": {"z_dim": 4, "hidden": [32], "clusters": 10, "epochs_per_round": 10, "n_init": 2},
    }
    settings.update(overrides)
    return tiny_config(**settings)


@pytest.fixture(scope="module")
def serket_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serket")
    return out, train(_serket_config(**{"train.figures": True}), out)


def _fake_encode_data(x, index):
    return lambda: {"x": x, "index": index, "x_labelled": x[:0], "y_labelled": torch.zeros(0, dtype=torch.long)}


# --- Serket mode -------------------------------------------------------------------------------
def test_the_kl_target_moves_to_the_assigned_cluster_means():
    torch.manual_seed(0)
    model = SerketVAEGMM(META, SerketOptions(z_dim=2, hidden=[16], clusters=3, epochs_per_round=1, n_init=1, alpha=2.0))
    x = torch.rand(40, 1, 8, 8)
    index = torch.arange(40).flip(0)  # dataset rows in another order than the batch
    assert (model.assignment == -1).all()
    log = model.end_epoch(1, _fake_encode_data(x, index))
    assert log["round"] == 1 and int(model.rounds) == 1
    classes = model.assignment[index]
    assert ((classes >= 0) & (classes < 3)).all() and len(classes.unique()) > 1
    # the message to row n is the mean of its cluster
    assert torch.equal(model.prior_loc(model.assignment[index]), model.gmm.means.float()[classes])
    # the loss changes by exactly alpha * (KL to N(mu_k, I) - KL to N(0, I)): the KL target moved
    loc, scale = model.guide.encode(x)
    q = Normal(loc, scale)
    kl_moved = kl_divergence(q, Normal(model.gmm.means.float()[classes], 1.0)).sum()
    kl_zero = kl_divergence(q, Normal(torch.zeros_like(loc), 1.0)).sum()
    torch.manual_seed(1)
    moved = model(x, index=index) * 40
    model.assignment.fill_(-1)
    torch.manual_seed(1)
    zero = model(x, index=index) * 40
    assert torch.allclose(moved - zero, 2.0 * (kl_moved - kl_zero), rtol=1e-4, atol=1e-3)


def test_serket_end_epoch_waits_for_the_end_of_a_round():
    model = SerketVAEGMM(META, SerketOptions(z_dim=2, hidden=[16], clusters=3, epochs_per_round=4, n_init=1))
    x = torch.rand(40, 1, 8, 8)
    for epoch in (1, 2, 3):
        assert model.end_epoch(epoch, _fake_encode_data(x, torch.arange(40))) == {}
    assert int(model.rounds) == 0 and model.end_epoch(4, _fake_encode_data(x, torch.arange(40)))["round"] == 1


def test_serket_needs_the_batch_rows_and_checks_its_options():
    model = SerketVAEGMM(META, SerketOptions(z_dim=2, hidden=[16], clusters=3))
    with pytest.raises(ConfigError, match="index"):
        model(torch.rand(4, 1, 8, 8))
    for bad in ({"message": "mode"}, {"covariance": "tied"}, {"clusters": 1}, {"init_std": 0.0}):
        with pytest.raises(ConfigError):
            SerketOptions(**bad)


def test_serket_run_writes_serket_files_per_round_and_final(serket_run):
    out, summary = serket_run
    n = summary["split"]["unlabelled"]
    assert n == 300
    index = np.loadtxt(out / "index.txt", dtype=int)
    truth = np.loadtxt(out / "category.txt", dtype=int)
    assert index.shape == truth.shape == (n,) and np.all(np.diff(index) > 0)
    for folder in (out / "rounds" / "001", out / "rounds" / "002", out):
        z = np.loadtxt(folder / "module001_vae" / "z_learn.txt")
        classes = np.loadtxt(folder / "module002_gmm" / "class_learn.txt", dtype=int)
        acc = float(np.loadtxt(folder / "module002_gmm" / "acc_learn.txt"))
        assert z.shape == (n, 4) and classes.shape == (n,) and classes.min() >= 0 and classes.max() < 10
        assert acc == pytest.approx(cluster_accuracy(classes, truth))
    assert not (out / "rounds" / "003").exists()
    final = np.loadtxt(out / "module002_gmm" / "class_learn.txt", dtype=int)
    assert np.array_equal(final, np.loadtxt(out / "rounds" / "002" / "module002_gmm" / "class_learn.txt", dtype=int))
    # the run's own metric of the last round is the file's accuracy on the codes it sent
    rounds = [r for r in read_metrics(out) if "round" in r]
    assert [r["round"] for r in rounds] == [1, 2] and [r["epoch"] for r in rounds] == [10, 20]
    assert summary["last"]["train_cluster_accuracy"] > 0.2  # ten clusters of 300 digits: random clusters score ~0.13
    assert (out / "figures" / "latent_before_after.png").stat().st_size > 10_000
    assert (out / "figures" / "cluster_samples.png").exists()


def test_serket_run_restores_its_messages(serket_run):
    out, _ = serket_run
    run = load_run(out, which="last")
    assert int(run.model.rounds) == 2
    rows = torch.from_numpy(np.loadtxt(out / "index.txt", dtype=np.int64))
    classes = torch.from_numpy(np.loadtxt(out / "module002_gmm" / "class_learn.txt", dtype=np.int64))
    assert torch.equal(run.model.assignment[rows], classes)
    x, y = run.tensors("train")
    assert run.model.cluster(x).shape == y.shape
    assert run.model.sample(5).shape == (5, 1, 8, 8)


def test_serket_recipe_is_serkets_setting():
    c = load_config(str(ROOT / "runs/serket-vae-gmm-mnist3000.toml"))
    assert c.model == "serket-vae-gmm" and c.data.name == "mnist5k" and c.data.limit_per_class == 300
    assert c.train.epochs == 5 * c.options["epochs_per_round"] == 1000 and c.train.batch_size == 500
    assert c.options["z_dim"] == 18 and c.options["clusters"] == 10 and c.options["alpha"] == 1.0


# --- end-to-end mode ---------------------------------------------------------------------------
