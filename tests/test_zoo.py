"""The entries' evaluation counts: counted in parts and summed, they give the metrics of the whole set."""

import math

import pyro
import pytest
import torch

from conftest import tiny_config
from pyrossl import runs
from pyrossl.train import train
from pyrossl.zoo import ZooModel

ENTRIES = {
    "vae": {"options": {"z_dim": 4, "hidden": [32]}},
    "m2": {"data.labels_per_class": 5, "options": {"z_dim": 4, "hidden": [32]}},
    "classifier": {"data.labels_per_class": 5, "options": {"hidden": [32]}},
    "gae": {"data.labels_per_class": 20, "options": {"z_dim": 4, "hidden": [32], "components": 1, "n_init": 1}},
    "gmm-vae": {"train.epochs": 2, "options": {"z_dim": 3, "hidden": [32], "warmup_epochs": 1, "n_init": 1}},
    "serket-vae-gmm": {"train.epochs": 2, "options": {"z_dim": 3, "hidden": [32], "epochs_per_round": 1, "n_init": 1}},
    "ccvae": {"data.labels_per_class": None, "options": {"z_style": 2, "hidden": [32], "k": 2}},
    "ccvae-attributes": {"model": "ccvae", "data.name": "shapes", "data.num_examples": 200, "data.labels_per_class": None,
                         "options": {"z_style": 2, "hidden": [32], "k": 2}},
}


def _same(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_counts_of_parts_add_up_to_the_metrics_of_the_whole_set(tmp_path, name):
    overrides = {"model": name, "train.epochs": 1, **ENTRIES[name]}
    train(tiny_config(**overrides), tmp_path / "run")
    model = runs.load_run(tmp_path / "run").model
    assert model.splits_evaluation()
    x, y = runs.load_run(tmp_path / "run").tensors("test")
    batch = 8  # parts that start on a batch boundary draw the same sampling noise as the whole set
    pyro.set_rng_seed(1)
    whole = model.evaluate(x, y, batch)
    pyro.set_rng_seed(1)
    parts = [model.evaluation_counts(x[a:b], y[a:b], batch) for a, b in ((0, 16), (16, 24), (24, len(x)))]
    summed = model.metrics_from_counts({k: sum(p[k] for p in parts) for k in parts[0]})
    assert summed.keys() == whole.keys() and len(whole) >= 2
    for key in whole:
        assert _same(summed[key], whole[key]), (key, summed[key], whole[key])


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
        for bad, message in [(int, "ZooModel subclass"), (type("NoName", (ZooModel,), {}), "needs a class attribute name"),
                             (type("NoOptions", (ZooModel,), {"name": "x"}), "must be a dataclass"),
                             (type("NoGuide", (ZooModel,), {"name": "x", "Options": MineOptions, "guides": {"a": ""}, "default_guide": "b"}),
                              "default_guide")]:
            with pytest.raises(ConfigError, match=message):
                register(bad)
    finally:
        MODELS.pop("mine-for-a-test", None)
