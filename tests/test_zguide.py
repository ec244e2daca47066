"""The z-guide family: shapes, gradients, exact moments, the flow's cached density, and every entry
with a Gaussian code trained, checkpointed and reloaded with each z-guide."""

import math

import pyro
import pytest
import torch

from common import tiny_config
from pyrossl import runs
from pyrossl.errors import ConfigError
from pyrossl.guides.normal import CodeGuide
from pyrossl.guides.zguide import Z_GUIDES, FlowZ, LowRankNormalZ, ZGuideOptions, make_z_guide
from pyrossl.run import load_run
from pyrossl.train import train

D, H = 3, 5


def _inputs(*lead):
    torch.manual_seed(0)
    h = torch.randn(*lead, H)
    return torch.randn(*lead, D), torch.rand(*lead, D) + 0.5, h


@pytest.mark.parametrize("name", list(Z_GUIDES))
def test_every_z_guide_draws_reparameterised_codes_of_the_right_shape(name):
    guide = make_z_guide(name, D, H, ZGuideOptions(z_rank=2, flows=2, flow_hidden=[8]))
    loc, scale, h = _inputs(4)
    loc.requires_grad_(True)
    q = guide.distribution(loc, scale, h)
    assert q.batch_shape == (4,) and q.event_shape == (D,)
    z = q.rsample()
    (q.log_prob(z).sum() + z.sum()).backward()
    assert loc.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guide.parameters())
    # enumerated classes and particles broadcast on the left of the data dimension
    loc3, scale3, _ = _inputs(6, 4)
    assert guide.distribution(loc3, scale3, h).rsample().shape == (6, 4, D)
    assert q.rsample((7,)).shape == (7, 4, D)


def test_diag_normal_has_no_parameters_so_old_checkpoints_keep_their_keys():
    guide = CodeGuide((1, 8, 8), D, hidden=(16,))
    assert not list(guide.z_guide.parameters())
    assert all(k.startswith("head.") for k in guide.state_dict())  # the keys of the mean-field encoder


def test_low_rank_moments_are_the_diagonal_of_its_covariance():
    guide = LowRankNormalZ(D, H, ZGuideOptions(z_rank=2))
    loc, scale, h = _inputs(4)
    q = guide.distribution(loc, scale, h)
    mean, var = guide.moments(loc, scale, h)
    assert torch.allclose(mean, q.mean) and torch.allclose(var, q.variance, atol=1e-6)
    assert torch.allclose(var, torch.diagonal(q.covariance_matrix, dim1=-2, dim2=-1), atol=1e-6)
    assert (q.covariance_matrix - torch.diag_embed(scale**2)).abs().max() > 1e-3  # correlated units


def test_flow_density_of_its_own_sample_equals_the_density_through_the_inverse():
    guide = FlowZ(D, H, ZGuideOptions(flows=3, flow_hidden=[8]))
    loc, scale, h = _inputs(4)
    with torch.no_grad():
        q = guide.distribution(loc, scale, h)
        z = q.sample()
        cached = q.log_prob(z)
        # a fresh distribution has no cache: its transforms run their O(d) inverse
        fresh = guide.distribution(loc, scale, h).log_prob(z.clone())
        assert torch.allclose(cached, fresh, atol=1e-4)
        # log q(z) = log N(z0) - sum log |det J|, the base recovered by the inverse
        z0 = z.clone()
        for t in reversed(guide._conditioned(h)):
            z0 = t.inv(z0)
        assert torch.allclose(z0, loc + scale * ((z0 - loc) / scale), atol=1e-5)


def test_flow_moments_are_deterministic_and_agree_across_identical_images():
    guide = FlowZ(D, H, ZGuideOptions(flows=2, flow_hidden=[8]))
    loc, scale, h = _inputs(1)
    loc, scale, h = loc.expand(3, D), scale.expand(3, D), h.expand(3, H)
    before = torch.get_rng_state()
    mean, var = guide.moments(loc, scale, h)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is not used
    assert torch.equal(mean[0], mean[1]) and torch.equal(var[0], var[2])
    again = guide.moments(loc, scale, h)
    assert torch.equal(again[0], mean)
    # with many base draws they are the moments of independent samples
    mean, var = guide.moments(loc, scale, h, num_samples=20000)
    z = guide.distribution(loc[:1], scale[:1], h[:1]).sample((20000,))
    assert torch.allclose(z.mean(0)[0], mean[0], atol=0.05) and torch.allclose(
        z.var(0)[0], var[0], rtol=0.15, atol=0.02
    )


def test_unknown_z_guide_and_bad_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown z_guide 'flw'"):
        make_z_guide("flw", D, H)
    from pyrossl.models.vae import VAEOptions

    for bad, message in (({"z_rank": 0}, "z_rank"), ({"flows": 0}, "flows"), ({"flow_hidden": []}, "flow_hidden")):
        with pytest.raises(ConfigError, match=message):
            VAEOptions(**bad)


ENTRIES = {
    "vae": {"options": {"z_dim": 3, "hidden": [16], "flow_hidden": [12]}},
    "m2": {"data.labels_per_class": 5, "options": {"z_dim": 3, "hidden": [16], "flow_hidden": [12]}},
    "gmm-vae": {
        "train.epochs": 2,
        "options": {"z_dim": 3, "hidden": [16], "warmup_epochs": 1, "n_init": 1, "flow_hidden": [12]},
    },
    "serket-vae-gmm": {
        "train.epochs": 2,
        "options": {"z_dim": 3, "hidden": [16], "epochs_per_round": 1, "n_init": 1, "flow_hidden": [12]},
    },
    "ccvae": {"data.labels_per_class": None, "options": {"z_style": 2, "hidden": [16], "k": 2, "flow_hidden": [12]}},
}


@pytest.mark.parametrize("z_guide", ["lowrank-normal", "flow"])
@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_every_entry_with_a_code_trains_with_the_z_guide_and_reloads_exactly(tmp_path, name, z_guide):
    overrides = {"model": name, "z_guide": z_guide, "train.epochs": 1, "data.limit_per_class": 30, **ENTRIES[name]}
    summary = train(tiny_config(**overrides), tmp_path / "run")
    assert summary["z_guide"] == z_guide
    assert all(math.isfinite(v) for v in summary["last"].values() if isinstance(v, float))
    kl = summary["last"].get("val_kl_per_unit", summary["last"].get("train_kl_per_unit"))
    assert kl and all(math.isfinite(v) and v > -1e-6 for v in kl)
    # the last checkpoint, reloaded by load_run, gives the trained entry's numbers again
    run = load_run(tmp_path / "run", which="last")
    assert run.config.z_guide == z_guide
    x, y = run.tensors("test")
    pyro.set_rng_seed(3)
    first = run.model.evaluate(x, y)
    again = load_run(tmp_path / "run", which="last")
    pyro.set_rng_seed(3)
    assert again.model.evaluate(x, y) == first
    if z_guide == "flow":  # the report redraws every figure from the checkpoint
        from pyrossl.report import write_report

        index, figures = write_report(tmp_path / "run", which="last")
        assert index.is_file() and any(p.name == "kl_per_unit.png" for p in figures)
    deterministic = ("reconstruction_bce", "accuracy", "cluster_accuracy", "nmi") if name != "ccvae" else ()
    for key in deterministic:
        if "test_" + key in summary["last"]:
            assert first[key] == pytest.approx(summary["last"]["test_" + key], rel=1e-6, abs=1e-9), key


def test_a_run_written_before_the_z_guides_reloads_and_resumes(tmp_path):
    """Its config.toml names the guide 'diag-normal' and has no z_guide, particles, objective or z-guide options."""
    from pyrossl.train import Trainer

    train(tiny_config(**{"train.epochs": 1}), tmp_path / "run")
    path = tmp_path / "run" / runs.CONFIG
    old = [
        line
        for line in path.read_text().splitlines()
        if not line.startswith(("z_guide", "particles", "objective", "z_rank", "flows"))
    ]
    path.write_text("\n".join(line.replace('guide = "amortised"', 'guide = "diag-normal"') for line in old) + "\n")
    before = runs.load_checkpoint(tmp_path / "run" / runs.CHECKPOINT)["model"]
    run = load_run(tmp_path / "run", which="last")
    assert (
        run.config.guide == "diag-normal"
        and run.model.guide_name == "amortised"
        and run.model.z_guide_name == "diag-normal"
    )
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    Trainer(runs.read_config(tmp_path / "run"), tmp_path / "run", resume=True)  # the configs agree once resolved
