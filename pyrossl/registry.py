"""Names -> zoo entries, the guides that fit each, and datasets."""

from __future__ import annotations

from pyrossl.config import Config, suggest, unknown_key
from pyrossl.errors import ConfigError
from pyrossl.models.ccvae import CCVAE
from pyrossl.models.classifier import Classifier
from pyrossl.models.gae import GAE
from pyrossl.models.gmm_vae import GMMVAE, SerketVAEGMM
from pyrossl.models.m2 import M2
from pyrossl.models.vae import VAE
from pyrossl.zoo import ZooModel

MODELS: dict[str, type[ZooModel]] = {cls.name: cls for cls in (VAE, M2, GAE, GMMVAE, SerketVAEGMM, CCVAE, Classifier)}


def model_class(name: str) -> type[ZooModel]:
    try:
        return MODELS[name]
    except KeyError:
        raise unknown_key(name, list(MODELS), what="model") from None


def resolve_guide(cls: type[ZooModel], guide: str | None) -> str:
    """The guide name to use for ``cls``: its default when ``guide`` is None; an error if it does not fit."""
    if guide is None:
        return cls.default_guide
    if guide not in cls.guides:
        raise ConfigError(f"guide '{guide}' does not fit model '{cls.name}'{suggest(guide, list(cls.guides))}")
    return guide


def build_model(config: Config, meta: dict) -> ZooModel:
    """The zoo entry a config names, built for a dataset's metadata."""
    cls = model_class(config.model)
    guide = resolve_guide(cls, config.guide)
    options = cls.make_options(config.options)
    return cls(meta, options, guide)


def resolve(config: Config) -> Config:
    """``config`` with the guide and model options filled in (what a run directory records)."""
    from dataclasses import replace

    from pyrossl.data import dataset_names

    cls = model_class(config.model)
    if config.data.name not in dataset_names():
        raise unknown_key(config.data.name, dataset_names(), what="dataset")
    options = cls.make_options(config.options)
    return replace(config, guide=resolve_guide(cls, config.guide), options=cls.options_dict(options))
