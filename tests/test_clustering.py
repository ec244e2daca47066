import pytest

from pyrossl.errors import ConfigError
from pyrossl.models.clustering import ClusteringVAEOptions
from pyrossl.models.gmm_vae import GMMVAEOptions
from pyrossl.models.serket_vae_gmm import SerketOptions
from pyrossl.registry import MODELS


@pytest.mark.parametrize("options", [SerketOptions, GMMVAEOptions])
@pytest.mark.parametrize(
    "bad",
    [
        {"clusters": 1},
        {"covariance": "spherical"},
        {"init_std": 0.0},
        {"reg_covar": 0.0},
        {"n_init": 0},
        {"net": "rnn"},
        {"z_rank": 0},
    ],
)
def test_both_gmm_prior_vaes_check_the_settings_they_share_alike(options, bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        options(**bad)


def test_the_shared_settings_are_declared_once_and_each_entry_keeps_its_defaults():
    shared = [f.name for f in ClusteringVAEOptions.__dataclass_fields__.values()]
    for name, defaults in {
        "serket-vae-gmm": {"z_dim": 18, "hidden": [100], "init_std": 0.1, "reg_covar": 1e-6},
        "gmm-vae": {"z_dim": 10, "hidden": [500, 500], "init_std": None, "reg_covar": 1e-3},
    }.items():
        options = MODELS[name].Options()
        assert isinstance(options, ClusteringVAEOptions)
        assert [r["name"] for r in MODELS[name].option_rows()][: len(shared)] == shared
        assert {k: getattr(options, k) for k in defaults} == defaults
