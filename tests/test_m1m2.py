import shutil

import pyro
import pytest
import torch

from common import enumerated_and_by_hand, tiny_config
from pyrossl import runs
from pyrossl.cli import main
from pyrossl.errors import ConfigError
from pyrossl.infer.iwae import importance_log_weights
from pyrossl.models.m1m2 import M1M2, M1M2Options
from pyrossl.run import load_run
from pyrossl.train import Trainer, train

META = {"name": "digits", "image_shape": (1, 8, 8), "num_classes": 3, "classes": ("a", "b", "c")}
TINY = {"z_dim": 2, "hidden": [16], "m1_z_dim": 3, "m1_hidden": [16], "m1_epochs": 2}
RUN_OPTIONS = {"z_dim": 3, "hidden": [32], "m1_z_dim": 4, "m1_hidden": [32], "m1_epochs": 3}


def _small(**options):
    torch.manual_seed(0)
    return M1M2(META, M1M2Options(**{**TINY, **options}), "enum")


@pytest.mark.parametrize("training", ["frozen", "joint"])
def test_a_frozen_m1_gets_no_gradient_and_a_joint_one_does(training):
    pyro.clear_param_store()
    model = _small(m1_training=training)
    x = torch.rand(20, 1, 8, 8)
    model.pretrain(lambda: {"x": x}, 0, {})
    model(x[:5], x[:3], torch.tensor([0, 1, 2])).backward()
    assert len(pyro.get_param_store()) == 0
    m1 = {n for n, _ in model.named_parameters() if n.startswith(("model.m1.", "guide.m1_encoder."))}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert m1 and (with_grad == set(dict(model.named_parameters())) - m1 if training == "frozen" else m1 <= with_grad)
    # M1's networks are held once: by the model (decoder) and the guide (encoder)
    assert not any(k.startswith("m1.") for k in model.state_dict())


def test_pretraining_is_deterministic_improves_m1_and_leaves_the_random_state_alone():
    # three prototypes, 5 % of pixels flipped: much to learn (random pixels have none)
    generator = torch.Generator().manual_seed(0)
    prototypes = (torch.rand(3, 1, 8, 8, generator=generator) > 0.5).float()
    flips = (torch.rand(60, 1, 8, 8, generator=generator) < 0.05).float()
    x = (prototypes[torch.arange(60) % 3] - flips).abs()
    models = [_small(m1_epochs=30) for _ in range(2)]
    start = models[0].m1_elbo(x)
    state = torch.get_rng_state()
    for model in models:
        model.pretrain(lambda: {"x": x}, 7, {})
    assert torch.equal(torch.get_rng_state(), state)
    first, second = (dict(m.named_parameters()) for m in models)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert models[0].m1_elbo(x) > start + 5, (start, models[0].m1_elbo(x))


def test_the_labelled_bound_is_the_importance_log_weight_of_the_two_layer_joint():
    """-L(x, y) with aux_weight 0 equals -(log p(x, c, y, z) - log q(c|x) - log q(z|c, y)) of the same draw."""
    model = _small(aux_weight=0.0)
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    pyro.set_rng_seed(3)
    loss = model.elbo.loss(model.model, model.guide, x, y)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        log_w = importance_log_weights(model.model, model.guide, x, y, num_samples=1)
    assert loss == pytest.approx(-log_w.sum().item(), rel=1e-5)


def test_with_mean_codes_the_enumerated_bound_is_the_average_of_its_per_image_estimate():
    """q(c|x) a point mass: TraceEnum_ELBO's U(x) and M2's per-image sum over classes (one z each) agree on
    average, and lie below the IWAE estimate of log sum_y p(x, y) at that code."""
    model = _small(codes="mean")
    x = torch.rand(4, 1, 8, 8)
    pyro.set_rng_seed(1)
    enumerated, by_hand, se = enumerated_and_by_hand(model, x)
    assert abs(enumerated - by_hand) < 4 * se, (enumerated, by_hand, se)
    assert by_hand < model.log_likelihood(x, 300).sum()


def test_the_model_samples_pixels_through_the_code_and_the_pictures_decode_m2s_mean_code():
    model = _small()
    trace = pyro.poutine.trace(model.model).get_trace(num=4)
    sites = [n for n, s in trace.nodes.items() if s["type"] == "sample" and n != "data"]
    assert sites == ["y", "z", "code", "x"] and trace.nodes["code"]["value"].shape == (4, 3)
    y, z = model.one_hot(torch.tensor([0, 1])), torch.zeros(2, 2)
    code = model.model.m2.decoder(y, z).chunk(2, -1)[0]
    expected = torch.sigmoid(model.model.m1.decoder(code)).reshape(2, 1, 8, 8)
    assert torch.allclose(model.decode(y, z), expected)
    assert model.class_conditional_samples(columns=4).shape == (12, 1, 8, 8)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"codes": "mode"}, "options.codes"),
        ({"m1_training": "fine"}, "options.m1_training"),
        ({"m1_epochs": 0}, "m1_epochs"),
        ({"m1_hidden": []}, "m1_hidden"),
        ({"m1_z_guide": "iaf"}, "m1_z_guide"),
        ({"m1_run": " "}, "m1_run"),
    ],
)
def test_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        M1M2Options(**{**TINY, **options})


def test_m2s_image_and_label_guide_settings_are_not_options_of_a_model_of_codes():
    with pytest.raises(ConfigError, match="net"):
        M1M2.make_options({**TINY, "net": "conv"})
    with pytest.raises(ConfigError, match="temperature_start"):
        M1M2.make_options({**TINY, "temperature_start": 2.0})
    names = {row["name"] for row in M1M2.option_rows()}
    assert {"z_dim", "aux_weight", "m1_run", "codes", "m1_training", "z_guide"} - names == {"z_guide"}
    assert not names & {"net", "classifier_net", "temperature_start", "sigma", "dirichlet_concentration"}


def _m1m2_config(**extra):
    return tiny_config(
        model="m1m2", **{"data.labels_per_class": 5, "train.epochs": 2, "options": dict(RUN_OPTIONS), **extra}
    )


def test_a_run_trains_m1_first_and_load_run_needs_nothing_else(tmp_path):
    summary = train(_m1m2_config(**{"train.figures": True}), tmp_path / "run")
    assert 0 <= summary["test_accuracy"] <= 1
    run = load_run(tmp_path / "run", which="last")
    x, y = run.tensors("test")
    assert run.model.evaluate(x, y)["accuracy"] == pytest.approx(summary["last"]["test_accuracy"])
    assert set(run.posterior(x[:3])) == {"y_probs", "z_loc", "z_scale", "code_loc", "code_scale"}
    for figure in ("class_samples", "confusion", "reconstructions", "latent_tsne"):
        assert (tmp_path / "run" / "figures" / f"{figure}.png").stat().st_size > 0


def test_a_resume_takes_m1_from_the_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    train(_m1m2_config(**{"train.epochs": 3}), tmp_path / "full")
    train(_m1m2_config(), tmp_path / "part")
    (tmp_path / "part" / runs.CONFIG).write_text((tmp_path / "full" / runs.CONFIG).read_text())

    def no_pretraining_on_resume(self, encode_data, seed, sources):
        raise AssertionError("pretrain called on a resume")

    monkeypatch.setattr(M1M2, "pretrain", no_pretraining_on_resume)
    train(_m1m2_config(**{"train.epochs": 3}), tmp_path / "part", resume=True)
    full, part = (runs.load_checkpoint(tmp_path / d / runs.CHECKPOINT)["model"] for d in ("full", "part"))
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)


def test_m1_from_a_vae_run_is_its_best_checkpoint_and_stays_when_that_run_is_gone(tmp_path):
    vae = {"z_dim": 4, "hidden": [32], "act": "softplus"}
    train(tiny_config(**{"options": vae}), tmp_path / "m1")
    config = _m1m2_config(**{"options": {**RUN_OPTIONS, "m1_run": str(tmp_path / "m1")}})
    trainer = Trainer(config, tmp_path / "run")
    trainer.setup()
    trainer.release()
    best = runs.load_checkpoint(tmp_path / "m1" / runs.BEST)["model"]
    assert torch.equal(trainer.model.model.m1.decoder.net[0].weight, best["loss.model.decoder.net.0.weight"])
    train(config, tmp_path / "run2")
    shutil.rmtree(tmp_path / "m1")
    run = load_run(tmp_path / "run2")
    x, _ = run.tensors("test")
    assert run.predict(x).shape == (len(x),)


def test_a_wrong_m1_run_is_one_line_and_exit_code_2(tmp_path, capsys):
    train(tiny_config(**{"options": {"z_dim": 4, "hidden": [32], "act": "softplus"}}), tmp_path / "vae")
    train(tiny_config(model="classifier", **{"data.labels_per_class": 5}), tmp_path / "clf")
    recipe = tmp_path / "m1m2.toml"
    recipe.write_text(
        'model = "m1m2"\n[data]\nname = "digits"\nlabels_per_class = 5\nvalidation = 0.1\ntest = 0.2\n'
        "[train]\nepochs = 1\nprogress = false\nfigures = false\n"
        '[options]\nz_dim = 3\nhidden = [32]\nm1_z_dim = 4\nm1_hidden = [32]\nm1_act = "softplus"\n'
    )
    cases = [
        (tmp_path / "nowhere", "is not a run directory"),
        (tmp_path / "clf", "is a 'classifier' run; M1 is a vae run"),
    ]
    for i, (m1_run, message) in enumerate(cases):
        code = main(["train", str(recipe), "--out", str(tmp_path / f"out{i}"), "--set", f"options.m1_run={m1_run}"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code = main(
        ["train", str(recipe), "--out", str(tmp_path / "out9"), "--set", f"options.m1_run={tmp_path / 'vae'}"]
        + ["--set", "options.m1_hidden=[64]"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "options.m1_hidden = [64] but the run has hidden = [32]" in err, err
    code = main(
        ["train", str(recipe), "--out", str(tmp_path / "out8"), "--set", f"options.m1_run={tmp_path / 'vae'}"]
        + ["--set", "data.name=mnist5k"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "was trained on 'digits', this run is on 'mnist5k'" in err, err
