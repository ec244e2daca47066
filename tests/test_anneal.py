"""The KL warm-up: the latent terms of every entry's ELBO weighted, the likelihood and observed sites not."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from common import CONTRACT, entry_and_batches, tiny_config, trainer_loss
from pyrossl import runs
from pyrossl.infer.anneal import LatentScaleMessenger, warmup_weight
from pyrossl.train import train


def test_only_latent_sites_are_scaled_in_model_and_guide():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with LatentScaleMessenger(0.25):
        trace = poutine.trace(model).get_trace(torch.zeros(3))
        with poutine.scale(scale=2.0):  # an entry's own weight (beta) multiplies with it
            scaled = poutine.trace(model).get_trace(torch.zeros(3))
    assert trace.nodes["z"]["scale"] == 0.25 and trace.nodes["x"]["scale"] == 1.0
    assert scaled.nodes["z"]["scale"] == 0.5 and scaled.nodes["x"]["scale"] == 2.0
    with pytest.raises(ValueError, match="at least 0"):
        LatentScaleMessenger(-0.1)


def test_warmup_weight_rises_linearly_to_one():
    assert [warmup_weight(e, 4) for e in (0.5, 1, 2, 4, 7)] == [0.125, 0.25, 0.5, 1.0, 1.0]
    assert warmup_weight(0.1, 0) == 1.0


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_every_entrys_loss_is_linear_in_the_weight_and_whole_at_one(name):
    """With the same random draws: weight 1 is the loss itself, and the loss is a + w b (the likelihood
    plus w times the latent terms), so w = 1/2 is the midpoint of w = 0 and w = 1."""
    entry, batches = entry_and_batches(name)
    entry.train()
    for args in batches:

        def loss(weight, args=args):
            pyro.set_rng_seed(0)
            if weight is None:
                return trainer_loss(entry, args)
            with LatentScaleMessenger(weight):
                return trainer_loss(entry, args)

        plain, zero, half, one = loss(None), loss(0.0), loss(0.5), loss(1.0)
        assert one.item() == plain.item()
        assert half.item() == pytest.approx((zero.item() + one.item()) / 2, rel=1e-5)
        if name not in ("classifier", "gae"):  # no latent term with a density (a classifier; a point code)
            assert zero.item() != one.item(), "the weight reached no latent term"
        entry.zero_grad()
        zero.backward()
        assert all(torch.isfinite(p.grad).all() for p in entry.parameters() if p.grad is not None)


def test_a_run_with_a_warmup_records_its_weight_and_resumes_to_the_same_numbers(tmp_path):
    settings = {"train.kl_warmup_epochs": 2, "train.batch_size": 512}  # 3 steps an epoch on the digits
    train(tiny_config(**{**settings, "train.epochs": 1}), tmp_path / "short")
    train(tiny_config(**{**settings, "train.epochs": 4}), tmp_path / "short", resume=True)
    train(tiny_config(**{**settings, "train.epochs": 4}), tmp_path / "long")
    train(tiny_config(**{"train.epochs": 4, "train.batch_size": 512}), tmp_path / "none")
    records = runs.read_metrics(tmp_path / "long")
    assert [r["kl_weight"] for r in records] == [0.5, 1.0, 1.0, 1.0]  # at each epoch's last step
    assert "kl_weight" not in runs.read_metrics(tmp_path / "none")[0]
    assert [r["loss"] for r in runs.read_metrics(tmp_path / "short")] == [r["loss"] for r in records]
    # the warm-up's loss is not the ELBO: smaller while the latent terms are down-weighted
    assert records[0]["loss"] < runs.read_metrics(tmp_path / "none")[0]["loss"]
    # evaluation is outside it: the validation ELBO of a finished warm-up run is a bound like any other
    assert all(r["val_elbo"] < 0 for r in records)
