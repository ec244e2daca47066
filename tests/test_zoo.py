"""The entries' evaluation counts: counted in parts and summed, they give the metrics of the whole set."""

import math

import pyro
import pytest
import torch

from common import CONTRACT, ENTRIES, entry_and_batches, tiny_config, trainer_loss
from pyrossl import runs
from pyrossl.run import load_run
from pyrossl.train import train
from pyrossl.zoo import ZooModel


def _same(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_counts_of_parts_add_up_to_the_metrics_of_the_whole_set(tmp_path, name):
    overrides = {"model": name, "train.epochs": 1, **ENTRIES[name]}
    train(tiny_config(**overrides), tmp_path / "run")
    model = load_run(tmp_path / "run").model
    assert model.splits_evaluation()
    x, y = load_run(tmp_path / "run").tensors("test")
    batch = 8  # parts that start on a batch boundary draw the same sampling noise as the whole set
    pyro.set_rng_seed(1)
    whole = model.evaluate(x, y, batch)
    pyro.set_rng_seed(1)
    parts = [model.evaluation_counts(x[a:b], y[a:b], batch) for a, b in ((0, 16), (16, 24), (24, len(x)))]
    summed = model.metrics_from_counts({k: sum(p[k] for p in parts) for k in parts[0]})
    assert summed.keys() == whole.keys() and len(whole) >= 2
    for key in whole:
        assert _same(summed[key], whole[key]), (key, summed[key], whole[key])


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_evaluation_never_changes_what_is_trained(tmp_path, name):
    """Evaluated after every epoch on every part with the code's diagnostics and the IWAE bound, or only
    after the last without them: the same parameters, optimiser state and training random state at the
    end, bit for bit."""
    settings = {"model": name, **ENTRIES[name], "train.epochs": 2}
    often = {"train.eval_every": 1, "train.iwae_samples": 3, "train.eval_test": True, "train.diagnose_every": 1}
    train(tiny_config(**settings, **often), tmp_path / "often")
    train(tiny_config(**settings, **{"train.eval_every": 2, "train.eval_batch_size": 7}), tmp_path / "once")
    often, once = (runs.load_checkpoint(tmp_path / d / runs.CHECKPOINT) for d in ("often", "once"))
    for part in ("model", "optimizer", "rng"):
        _identical(often[part], once[part], part)


def _identical(a, b, where):
    """Nested containers of tensors and numbers, equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _identical(u, v, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_an_entry_without_counts_says_so():
    class Plain(ZooModel):
        def evaluate(self, x, y, batch_size=1000):
            return {"accuracy": 1.0}

    assert not Plain.splits_evaluation()


def test_register_adds_an_entry_and_refuses_what_is_not_one():
    from dataclasses import dataclass

    from pyrossl.errors import ConfigError
    from pyrossl.registry import MODELS, model_class, register
    from pyrossl.zoo import ZooModel

    @dataclass
    class MineOptions:
        width: int = 3

    class Mine(ZooModel):
        name = "mine-for-a-test"
        Options = MineOptions
        guides = {"none": "nothing"}
        default_guide = "none"

    try:
        assert register(Mine) is Mine and model_class("mine-for-a-test") is Mine
        assert [r["name"] for r in Mine.option_rows()] == ["width"]

        class Other(Mine):
            pass

        with pytest.raises(ConfigError, match="taken by Mine"):
            register(Other)
        assert register(Other, replace=True) is Other
        for bad, message in [
            (int, "ZooModel subclass"),
            (type("NoName", (ZooModel,), {}), "needs a class attribute name"),
            (type("NoOptions", (ZooModel,), {"name": "x"}), "must be a dataclass"),
            (
                type(
                    "NoGuide",
                    (ZooModel,),
                    {"name": "x", "Options": MineOptions, "guides": {"a": ""}, "default_guide": "b"},
                ),
                "default_guide",
            ),
        ]:
            with pytest.raises(ConfigError, match=message):
                register(bad)
    finally:
        MODELS.pop("mine-for-a-test", None)


# --- the contract: entry.model, entry.guide and entry.elbo are a Pyro model, guide and ELBO -------------


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_plain_pyro_svi_trains_every_parameter_of_everyentry_and_batches(name):
    """pyro.infer.SVI with Pyro's own optimiser and the entry's ELBO, in Pyro's default (global) mode."""
    from pyro.infer import SVI
    from pyro.optim import ClippedAdam

    assert not pyro.settings.get("module_local_params")
    torch.manual_seed(0)
    entry, batches = entry_and_batches(name)
    before = {
        k: p.detach().clone()
        for k, p in [*entry.model.named_parameters("model."), *entry.guide.named_parameters("guide.")]
    }
    svi = SVI(entry.model, entry.guide, ClippedAdam({"lr": 1e-2}), entry.elbo)
    for _ in range(3):
        for args in batches:
            assert math.isfinite(svi.step(*args))
    after = dict([*entry.model.named_parameters("model."), *entry.guide.named_parameters("guide.")])
    # a frozen part (M1 of m1m2) is not trained, nor what a variant leaves out of its model (the scale of
    # q(c|x) when m1m2 models the mean code)
    unused = {"m1m2-mean-joint": ("guide..m1_encoder.head.scale.",)}.get(name, ())
    trained = {k: p for k, p in after.items() if p.requires_grad and not k.startswith(unused)}
    unchanged = [k for k, p in trained.items() if torch.equal(p.detach(), before[k])]
    assert not unchanged and len(trained) >= 2, unchanged


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_svi_loss_is_the_trainers_loss_and_the_elbos_three_methods_agree(name):
    from pyro.infer import SVI
    from pyro.optim import ClippedAdam

    torch.manual_seed(0)
    entry, batches = entry_and_batches(name)
    svi = SVI(entry.model, entry.guide, ClippedAdam({"lr": 0.0}), entry.elbo)
    for args in batches:
        values = []
        for compute in (
            lambda args=args: trainer_loss(entry, args).item(),
            lambda args=args: svi.evaluate_loss(*args),
            lambda args=args: svi.step(*args),
            lambda args=args: entry.elbo.loss(entry.model, entry.guide, *args),
            lambda args=args: entry.elbo.differentiable_loss(entry.model, entry.guide, *args).item(),
        ):
            pyro.set_rng_seed(3)
            values.append(compute())
        assert values == pytest.approx([values[0]] * len(values), rel=1e-5, abs=1e-3), (args[1:] and "labelled", values)


@pytest.mark.parametrize("name", ["vae", "m2", "ccvae", "gmm-vae", "classifier", "gae", "serket-vae-gmm"])
def test_pyros_tools_work_on_everyentry_and_batches(name):
    """poutine.trace / condition / do, Predictive, infer_discrete where a site is discrete, render_model."""
    from pyro import poutine
    from pyro.infer import Predictive, config_enumerate, infer_discrete

    torch.manual_seed(0)
    entry, batches = entry_and_batches(name)
    args = batches[-1]
    with torch.no_grad():
        guide_trace = poutine.trace(entry.guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(entry.model, trace=guide_trace)).get_trace(*args)
        latents = {
            k: s["value"]
            for k, s in model_trace.nodes.items()
            if s["type"] == "sample"
            and not s["is_observed"]
            and k in guide_trace.nodes
            and type(s["fn"]).__name__ != "_Subsample"
        }
        observed = {k for k, s in model_trace.nodes.items() if s["type"] == "sample" and s["is_observed"]}
        assert "x" in observed or name == "classifier"
        if latents:
            conditioned = poutine.trace(poutine.condition(entry.model, data=latents)).get_trace(*args)
            for k, v in latents.items():
                assert torch.equal(conditioned.nodes[k]["value"], v) and conditioned.nodes[k]["is_observed"]
        if latents and name != "gae":  # do() still draws the site it cuts off, and a flat prior cannot be drawn
            intervened = poutine.trace(poutine.do(entry.model, data=latents)).get_trace(*args)
            # downstream of the intervention, x is scored as under the conditioned latents
            for trace in (conditioned, intervened):
                trace.compute_log_prob()
            assert torch.allclose(intervened.nodes["x"]["log_prob"], conditioned.nodes["x"]["log_prob"])
        if name != "gae":
            draws = Predictive(entry.model, guide=entry.guide, num_samples=2)(*args)
        else:  # Pyro's Predictive first draws from the priors, and a flat one cannot be drawn: the guide's draws only
            from pyrossl.infer.predictive import guided_predictive_model

            draws = Predictive(guided_predictive_model(entry.model, entry.guide), num_samples=2)(*args)
        assert draws and all(v.shape[0] in (1, 2) for v in draws.values())
        discrete = {"ccvae": "y", "gmm-vae": "c", "m2": "y"}.get(name)
        if discrete:
            fixed = {k: v for k, v in latents.items() if k != discrete}
            model = config_enumerate(poutine.condition(entry.model, data=fixed), "parallel")
            decoded = poutine.trace(infer_discrete(model, first_available_dim=-2, temperature=0)).get_trace(*args[:1])
            assert decoded.nodes[discrete]["value"].shape[0] == args[0].shape[0]
        # render_model traces the model alone: the autoencoder's flat prior is given its latents
        model = poutine.condition(entry.model, data=latents) if name == "gae" else entry.model
        graph = pyro.render_model(model, model_args=args)
        assert "x" in graph.source or name == "classifier"


def test_importing_the_zoo_changes_no_pyro_setting_and_no_param():
    import subprocess
    import sys

    code = (
        "import pyro, json; pyro.param('mine', lambda: __import__('torch').zeros(2)); before = pyro.settings.get(); "
        "import pyrossl, pyrossl.registry, pyrossl.cli, pyrossl.train, pyrossl.report; "
        "assert pyro.settings.get() == before, (before, pyro.settings.get()); "
        "assert list(pyro.get_param_store().keys()) == ['mine']; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_zoos_own_calls_leave_pyros_param_store_alone(tmp_path):
    pyro.param("mine", torch.zeros(2))
    train(tiny_config(**{"model": "m2", **ENTRIES["m2"], "train.epochs": 1}), tmp_path / "run")
    run = load_run(tmp_path / "run")
    x, y = run.tensors("test")
    run.posterior(x)
    run.predictive(2)(x)
    run.model.log_likelihood(x[:4], 3)
    run.model.evaluate(x, y)
    assert list(pyro.get_param_store().keys()) == ["mine"]
    assert not pyro.settings.get("module_local_params")


def test_the_posterior_predictive_draws_images_not_the_data(tmp_path):
    train(tiny_config(**{"model": "vae", **ENTRIES["vae"], "train.epochs": 1}), tmp_path / "run")
    run = load_run(tmp_path / "run")
    x, _ = run.tensors("test")
    draws = run.predictive(3)(x[:5])
    assert draws["x"].shape == (3, 5, x[0].numel()) and draws["z"].shape[:2] == (3, 5)
    assert set(draws["x"].unique().tolist()) <= {0.0, 1.0}  # Bernoulli pixels drawn from p(x|z)
    assert not torch.equal(draws["x"][0], draws["x"][1]) and not torch.equal(draws["x"][0], x[:5].flatten(1))


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_train_particles_is_honoured_by_everyentry_and_batches(name):
    torch.manual_seed(0)
    entry, batches = entry_and_batches(name, **{"train.particles": 3})
    assert entry.elbo.num_particles == 3
    for args in batches:
        assert math.isfinite(entry.elbo.loss(entry.model, entry.guide, *args))


def test_an_elbo_that_ignores_particles_or_an_objective_is_refused_with_the_reason():
    from dataclasses import dataclass

    from pyro.infer import Trace_ELBO

    from pyrossl.errors import ConfigError
    from pyrossl.registry import MODELS, build_model, register

    @dataclass
    class NoOptions:
        pass

    class OneParticle(ZooModel):
        name = "one-particle-for-a-test"
        Options = NoOptions
        guides = {"none": "nothing"}
        default_guide = "none"

        def __init__(self, meta, options, guide, **settings):
            super().__init__(meta, options, guide, **settings)
            self.model, self.guide, self.elbo = torch.nn.Module(), torch.nn.Module(), Trace_ELBO()

    register(OneParticle)
    try:
        meta = {"image_shape": (1, 8, 8), "num_classes": 10}
        assert build_model(tiny_config(model=OneParticle.name), meta).elbo.num_particles == 1
        with pytest.raises(ConfigError, match="does not honour train.particles = 2: its elbo has num_particles = 1"):
            build_model(tiny_config(**{"model": OneParticle.name, "train.particles": 2}), meta)
        with pytest.raises(ConfigError, match="OneParticle.objectives lists elbo only"):
            build_model(tiny_config(**{"model": OneParticle.name, "train.objective": "iwae"}), meta)
    finally:
        MODELS.pop(OneParticle.name, None)
    for name, reason in [
        ("gmm-vae", "c is enumerated"),
        ("gae", "point mass"),
        ("classifier", "no latent variable"),
        ("ccvae", "eq. 4"),
        ("m2", "needs every latent reparameterised"),
    ]:
        with pytest.raises(ConfigError, match=reason):
            entry_and_batches(name, **{"train.objective": "iwae"})
