"""Names -> zoo entries, the guides that fit each, and datasets."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pyrossl.config import Config, suggest, unknown_key
from pyrossl.errors import ConfigError
from pyrossl.infer.objective import Objective
from pyrossl.models.adgm import ADGM, SDGM
from pyrossl.models.ccvae import CCVAE
from pyrossl.models.classifier import Classifier
from pyrossl.models.gae import GAE
from pyrossl.models.gmm_vae import GMMVAE
from pyrossl.models.m1m2 import M1M2
from pyrossl.models.m2 import M2
from pyrossl.models.serket_vae_gmm import SerketVAEGMM
from pyrossl.models.vae import VAE
from pyrossl.plugins import load_plugins, normalise
from pyrossl.zoo import ZooModel

MODELS: dict[str, type[ZooModel]] = {
    cls.name: cls for cls in (VAE, M2, M1M2, ADGM, SDGM, GAE, GMMVAE, SerketVAEGMM, CCVAE, Classifier)
}


def register(cls: type[ZooModel], replace: bool = False) -> type[ZooModel]:
    """Add a zoo entry of your own under ``cls.name``, so recipes, the trainer, ``load_run``,
    ``report`` and ``ablate`` take it like the built-in ones; returns ``cls`` (usable as a decorator).

    The class must be a :class:`~pyrossl.zoo.ZooModel` with a ``name``, an ``Options`` dataclass,
    ``guides`` (name -> description) and a ``default_guide`` among them. A name already taken is
    refused unless ``replace`` (re-running a notebook cell that defines the entry again).
    """
    import dataclasses

    if not (isinstance(cls, type) and issubclass(cls, ZooModel)):
        raise ConfigError(f"register takes a ZooModel subclass, not {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cls.__name__} needs a class attribute name (the recipe's model = ...)")
    if not dataclasses.is_dataclass(getattr(cls, "Options", None)):
        raise ConfigError(f"{cls.__name__}.Options must be a dataclass (the recipe's [options])")
    guides = getattr(cls, "guides", None)
    if not isinstance(guides, Mapping) or getattr(cls, "default_guide", None) not in guides:
        raise ConfigError(f"{cls.__name__} needs guides (name -> description) and a default_guide among them")
    if name in MODELS and MODELS[name] is not cls and not replace:
        raise ConfigError(f"model name '{name}' is taken by {MODELS[name].__name__} (pass replace=True to replace it)")
    MODELS[name] = cls
    return cls


def model_class(name: str) -> type[ZooModel]:
    try:
        return MODELS[name]
    except KeyError:
        raise unknown_key(name, list(MODELS), what="model") from None


def resolve_guide(cls: type[ZooModel], guide: str | None) -> str:
    """The guide name to use for ``cls``: its default when ``guide`` is None; an error if it does not fit."""
    if guide is None:
        return cls.default_guide
    guide = cls.guide_aliases.get(guide, guide)
    if guide not in cls.guides:
        if guide in cls.z_guides:
            raise ConfigError(
                f"guide '{guide}' does not fit model '{cls.name}': it is a guide of the code z, "
                f'chosen with z_guide = "{guide}" (guides: {", ".join(cls.guides)})'
            )
        raise ConfigError(f"guide '{guide}' does not fit model '{cls.name}'{suggest(guide, list(cls.guides))}")
    return guide


def resolve_z_guide(cls: type[ZooModel], z_guide: str | None) -> str | None:
    """The z-guide of ``cls``: its default (``diag-normal``) when None; an error naming those that fit."""
    if z_guide is None:
        return next(iter(cls.z_guides), None)
    if z_guide not in cls.z_guides:
        if not cls.z_guides:
            raise ConfigError(
                f"z_guide '{z_guide}' does not fit model '{cls.name}': it has no Gaussian code "
                f"(models with one: {', '.join(n for n, c in MODELS.items() if c.z_guides)})"
            )
        raise ConfigError(f"z_guide '{z_guide}' does not fit model '{cls.name}'{suggest(z_guide, list(cls.z_guides))}")
    return z_guide


def objective_of(config: Config) -> Objective:
    return Objective(config.train.objective, config.train.particles)


def build_model(config: Config, meta: dict) -> ZooModel:
    """The zoo entry a config names, built for a dataset's metadata (its plugins imported first)."""
    load_plugins(config.plugins)
    cls = model_class(config.model)
    guide = resolve_guide(cls, config.guide)
    z_guide = resolve_z_guide(cls, config.z_guide)
    options = cls.make_options(config.options)
    cls.check_objective(guide, z_guide, objective_of(config))
    entry = cls(meta, options, guide, z_guide=z_guide, objective=objective_of(config))
    entry.check_elbo()
    return entry


def resolve(config: Config) -> Config:
    """``config`` with the guide and model options filled in and its plugins imported, files by their
    absolute paths (what a run directory records)."""
    from dataclasses import replace

    from pyrossl.data import dataset_names
    from pyrossl.data.sources import ARRAYS

    plugins = list(dict.fromkeys(normalise(p) for p in config.plugins))
    load_plugins(plugins)
    cls = model_class(config.model)
    if config.data.name not in dataset_names() and config.data.name != ARRAYS:
        raise unknown_key(config.data.name, dataset_names(), what="dataset")
    options = cls.make_options(config.options)
    guide, z_guide = resolve_guide(cls, config.guide), resolve_z_guide(cls, config.z_guide)
    cls.check_objective(guide, z_guide, objective_of(config))
    # data files by absolute path too: eval, report or a resume from another folder read the same files
    d = config.data
    data = replace(
        d, **{k: str(Path(v).expanduser().absolute()) for k, v in (("data_dir", d.data_dir), ("path", d.path)) if v}
    )
    return replace(config, guide=guide, z_guide=z_guide, options=cls.options_dict(options), plugins=plugins, data=data)
