"""Run configuration: a TOML recipe plus ``key=value`` overrides, checked against dataclasses.

A recipe looks like::

    plugins = ["my_guides.py"]  # modules or files that register entries and guides (pyrossl.plugins)
    model = "vae"            # a zoo entry (``pyrossl list``)
    guide = "amortised"      # one of the guides that fit it; omitted -> the model's default
    z_guide = "flow"         # the guide of the continuous code z; omitted -> diag-normal
    seed = 0

    [data]                   # DataConfig
    name = "mnist5k"
    labels_per_class = 0

    [train]                  # TrainConfig
    epochs = 20

    [options]                # the model's and guide's own settings (its Options dataclass)
    z_dim = 16

Every key is checked: an unknown one is a :class:`~pyrossl.errors.ConfigError` that names the
closest valid key, and values are coerced to the declared type or rejected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyrossl.errors import ConfigError


def setting(default: Any, doc: str) -> Any:
    """A dataclass field with its documentation, ``field(default=..., metadata={"doc": doc})``: what the
    option tables of the documentation and ``pyrossl models`` show (:func:`option_rows`). A list or dict
    default is copied for each instance, as ``default_factory`` would."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def option_rows(options_class) -> list[dict[str, str]]:
    """Every field of a settings dataclass: ``name``, ``type``, ``default`` and ``doc``, base classes'
    fields first. The doc is the field's ``metadata["doc"]`` (:func:`setting`), or that of the nearest base
    class declaring the field with one, so a subclass that only changes a default keeps its doc."""
    rows = []
    for f in dataclasses.fields(options_class):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        declared = (getattr(k, "__dataclass_fields__", {}).get(f.name) for k in options_class.__mro__)
        doc = next((d.metadata["doc"] for d in declared if d is not None and d.metadata.get("doc")), "")
        rows.append(
            {
                "name": f.name,
                "type": f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)),
                "default": repr(default),
                "doc": doc,
            }
        )
    return rows


#: what ``train.optimizer`` may name (:func:`pyrossl.train.make_optimizer` builds it)
#: ``train.optimizer`` -> the ``torch.optim`` class it names
OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}
#: the values of ``train.precision`` (:mod:`pyrossl.precision`)
PRECISIONS = ("fp32", "bf16", "auto")
#: the experiment trackers ``train.loggers`` may name (:mod:`pyrossl.trackers`)
TRACKERS = ("csv", "tensorboard", "mlflow")
#: ``train.lr_schedule``: the name of each schedule and its ``torch.optim.lr_scheduler`` class (``constant``: none)
LR_SCHEDULES = {"constant": None, "cosine": "CosineAnnealingLR", "step": "StepLR", "plateau": "ReduceLROnPlateau"}


def dotted(d: dict, prefix: str = "") -> dict:
    """A nested config table as one level of dotted keys: ``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``
    (the names ``--set`` takes)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(dotted(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_seed(key: str, seed: int | None) -> None:
    """A seed every generator takes (torch, numpy and random all take 0 .. 2**32 - 1), or None."""
    if seed is not None and not 0 <= seed < 2**32:
        raise ConfigError(f"{key} must be in 0 .. 2**32 - 1, not {seed}")


def split_amount(key: str, value: float) -> int | float:
    """A hold-out size as the split takes it: a fraction in [0, 1), or a whole count of examples.

    The two share one recipe field, so ``1.5`` is neither: it is refused rather than rounded.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{key} must be a fraction in [0, 1) or a whole count of examples, not {value!r}")
    if value < 1:
        return float(value)
    if not float(value).is_integer():
        raise ConfigError(f"{key} = {value!r}: a count of examples must be whole (a fraction must be below 1)")
    return int(value)


@dataclass
class DataConfig:
    """Which dataset, and how it is split (see :func:`pyrossl.data.make_split`)."""

    name: str = setting(
        "digits", "digits | mnist5k | mnist | fashion-mnist | celeba | shapes | npz (pyrossl datasets lists them)"
    )
    data_dir: str | None = setting(None, "folder holding the dataset's files (mnist, fashion-mnist)")
    path: str | None = setting(None, "the .npz file of the npz dataset")
    attributes: list[str] | None = setting(
        None, "celeba, shapes: which attributes (celeba default: the 18 of Joy et al. 2021)"
    )
    image_size: int | None = setting(None, "celeba, shapes: side of the square images (default 64, 32)")
    num_examples: int | None = setting(
        None, "shapes: how many images to generate (default 24,000; a sixth is the test part)"
    )
    max_per_part: int | None = setting(None, "celeba: at most this many images of each official partition")
    labels_per_class: int | None = setting(None, "None: every training example labelled; 0: none")
    label_fraction: float | None = setting(
        None, "the labelled fraction of the training examples (instead of labels_per_class)"
    )
    validation: float = setting(0.1, "a fraction (< 1) or a count (>= 1) held out for model selection")
    test: float = setting(0.2, "used only when the dataset has no official test set")
    limit_per_class: int | None = setting(
        None, "at most this many examples of each class (a smaller dataset for quick runs)"
    )
    split_seed: int | None = setting(None, "the seed of the split alone; None: the run's seed")
    binarize: bool = setting(False, "dynamic binarisation: x ~ Bernoulli(pixel) afresh for every batch")

    def __post_init__(self):
        """The numbers, checked before any data is loaded: hold-outs are fractions in [0, 1) or whole
        counts, counts are non-negative (limits and generated sizes at least 1)."""
        split_amount("data.validation", self.validation)
        split_amount("data.test", self.test)
        if self.labels_per_class is not None and self.labels_per_class < 0:
            raise ConfigError(f"data.labels_per_class must be 0 (no labels) or more, not {self.labels_per_class}")
        if self.label_fraction is not None and not 0 <= self.label_fraction <= 1:
            raise ConfigError(f"data.label_fraction must be a fraction in [0, 1], not {self.label_fraction}")
        for key in ("limit_per_class", "num_examples", "max_per_part", "image_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"data.{key} must be at least 1 (or left out), not {value}")
        check_seed("data.split_seed", self.split_seed)


@dataclass
class TrainConfig:
    """The one training loop's settings (see :mod:`pyrossl.train`)."""

    epochs: int = setting(10, "passes over the (unlabelled) training examples")
    batch_size: int = setting(128, "examples per step (unlabelled batch when the model uses labels)")
    labelled_batch_size: int | None = setting(None, "None: same as batch_size")
    labelled_every: int = setting(
        1, "a labelled batch joins every n-th step (1: every step; Pyro's SS-VAE example: once per epoch)"
    )
    lr: float = setting(1e-3, "learning rate of the optimizer")
    optimizer: str = setting("adam", "adam | adamw | sgd")
    weight_decay: float = setting(0.0, "the optimizer's weight decay (adamw: decoupled)")
    clip_norm: float | None = setting(None, "clip the gradients' global norm to this; None: no clipping")
    lr_schedule: str = setting(
        "constant",
        "constant | cosine | step | plateau: the learning rate over the epochs (torch.optim.lr_scheduler: cosine "
        "from lr to lr_min over train.epochs, step: times lr_factor every lr_step_epochs, plateau: times lr_factor "
        "after lr_step_epochs evaluated epochs without a better selection metric)",
    )
    lr_step_epochs: int = setting(10, "step: epochs between decays; plateau: evaluated epochs without improvement")
    lr_factor: float = setting(0.1, "step, plateau: what each decay multiplies the learning rate by")
    lr_min: float = setting(0.0, "cosine, plateau: the lowest learning rate")
    kl_warmup_epochs: int = setting(
        0,
        "the weight of every latent term log p(z) - log q(z) (the KLs) rises linearly from 0 to 1 over this many "
        "epochs, in every entry (pyrossl.infer.anneal); the loss is not a bound until it ends. 0: none",
    )
    patience: int | None = setting(
        None,
        "stop early after this many evaluated epochs without a better selection metric (the summary says why); "
        "None: train every epoch",
    )
    eval_batch_size: int = setting(1000, "examples per batch when evaluating")
    eval_every: int = setting(1, "evaluate (and select the best epoch) every n epochs, and after the last")
    eval_test: bool = setting(
        False,
        "score the test part after every evaluated epoch too (test curves); the summary's test metrics of the "
        "best and the last epoch are computed at the end either way",
    )
    diagnose_every: int = setting(
        5,
        "the code's KL per unit and active units (Monte Carlo for a flow) on evaluated epochs that are multiples "
        "of n, and after the last; 0: after the last only",
    )
    checkpoint_every: int = setting(1, "write checkpoint.pt every n epochs, after every evaluation, and after the last")
    particles: int = setting(1, "samples of the latents per example and step in the ELBO (or the IWAE bound)")
    objective: str = setting(
        "elbo", "elbo | iwae (importance-weighted bound with `particles` samples; no enumerated sites)"
    )
    iwae_samples: int = setting(0, "k of the IWAE log-likelihood estimate at the end; 0 turns it off")
    progress: bool = setting(True, "show a progress bar per epoch")
    loggers: list[str] = setting(
        [],
        "experiment trackers beside metrics.jsonl: csv (metrics.csv), tensorboard (<run>/tensorboard), mlflow "
        "(a run per zoo run; extras pyrossl[tensorboard], pyrossl[mlflow]); see pyrossl.trackers",
    )
    tracking_uri: str | None = setting(
        None, "mlflow: the tracking store; None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder"
    )
    experiment: str | None = setting(None, "mlflow: the experiment's name; None: pyrossl (an ablation: its folder)")
    figures: bool = setting(
        True, "draw the run's figures (figures/*.png, index.html) when it ends; `pyrossl report` draws them later"
    )
    on_nonfinite: str = setting("stop", "stop | skip: what a non-finite loss or gradient does")
    precision: str = setting(
        "fp32",
        "fp32 | bf16 | auto: bf16 runs the networks' layers in bfloat16, log-densities, KLs and sums stay "
        "float32; auto: bf16 where the device computes it natively (summary.json says which ran)",
    )

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be at least 1, not {self.epochs}")
        for key in ("batch_size", "eval_batch_size", "eval_every", "checkpoint_every", "labelled_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be at least 1, not {getattr(self, key)}")
        if self.diagnose_every < 0:
            raise ConfigError(
                f"train.diagnose_every must be 0 (after the last epoch only) or more, not {self.diagnose_every}"
            )
        if self.labelled_batch_size is not None and self.labelled_batch_size < 1:
            raise ConfigError(f"train.labelled_batch_size must be at least 1, not {self.labelled_batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be positive, not {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer '{self.optimizer}' (valid: {', '.join(OPTIMIZERS)})")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be 0 or positive, not {self.weight_decay}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"train.clip_norm must be positive (or left out), not {self.clip_norm}")
        for name in self.loggers:
            if name not in TRACKERS:
                raise ConfigError(f"unknown tracker '{name}' in train.loggers (valid: {', '.join(TRACKERS)})")
        if len(set(self.loggers)) != len(self.loggers):
            raise ConfigError(f"train.loggers names a tracker twice: {self.loggers}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown train.lr_schedule '{self.lr_schedule}' (valid: {', '.join(LR_SCHEDULES)})")
        if self.lr_step_epochs < 1:
            raise ConfigError(f"train.lr_step_epochs must be at least 1, not {self.lr_step_epochs}")
        if not 0 < self.lr_factor < 1:
            raise ConfigError(f"train.lr_factor must be in (0, 1), not {self.lr_factor}")
        if not 0 <= self.lr_min < self.lr:
            raise ConfigError(f"train.lr_min must be at least 0 and below train.lr ({self.lr}), not {self.lr_min}")
        if self.kl_warmup_epochs < 0:
            raise ConfigError(f"train.kl_warmup_epochs must be 0 (none) or more, not {self.kl_warmup_epochs}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"train.patience must be at least 1 (or left out), not {self.patience}")
        if self.iwae_samples < 0:
            raise ConfigError(f"train.iwae_samples must be 0 (off) or positive, not {self.iwae_samples}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.on_nonfinite must be 'stop' or 'skip', not '{self.on_nonfinite}'")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, not '{self.precision}'")
        # train.objective and train.particles are the entry's to check (ZooModel.check_objective)


@dataclass
class Config:
    model: str = setting("vae", "the zoo entry to train (pyrossl models lists them)")
    guide: str | None = setting(None, "the entry's guide (pyrossl models lists them); None: the entry's default")
    z_guide: str | None = setting(
        None, "the guide of the continuous code (diag-normal, lowrank-normal, flow); None: diag-normal"
    )
    seed: int = setting(0, "seeds the parameters' initialisation, the batches and the split (unless data.split_seed)")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    threads: int | None = setting(None, "CPU threads of torch; None: torch's default")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    options: dict[str, Any] = field(default_factory=dict)
    plugins: list[str] = setting([], "modules or .py files registering entries and guides, imported first")

    def __post_init__(self):
        check_seed("seed", self.seed)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, not {self.threads}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "train": TrainConfig}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(valid))})"


def unknown_key(key: str, valid: list[str], what: str = "key") -> ConfigError:
    """The error for a name that is not in ``valid`` (a config key, a model...), naming the closest valid one."""
    return ConfigError(f"unknown {what} '{key}'{suggest(key, valid)}")


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` converted to the type ``annotation`` declares, or a ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"'{key}' cannot be {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        (inner, *_) = typing.get_args(annotation) or (Any,)
        items = [coerce(v, inner, key) for v in value]
        return tuple(items) if origin is tuple else items
    if annotation is Any or origin is dict:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, not {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"'{key}' must be an integer, not {value!r}")
        if not -(2**63) <= value < 2**63:  # TOML's range; a float such as 1e30 is integral but no setting's size
            raise ConfigError(f"'{key}' = {value!r} is out of range")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, not {value!r}")
        if not math.isfinite(value):  # TOML has nan and inf; no setting means them
            raise ConfigError(f"'{key}' must be a finite number, not {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, not {value!r}")
        return value
    return value


def build_dataclass(cls, values: dict, where: str = ""):
    """An instance of dataclass ``cls`` from ``values``: unknown keys and bad types are ConfigErrors."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise unknown_key(f"{where}{key}", [f"{where}{k}" for k in types_])
        kwargs[key] = coerce(value, types_[key], f"{where}{key}")
    return cls(**kwargs)


#: how deeply arrays and tables may nest in a recipe or an override (no setting nests more than twice)
MAX_NESTING = 32


def _parse_toml(text: str, where: str) -> dict:
    """``tomllib.loads`` whose limits are ConfigErrors: nesting too deep for the parser, integers of more
    digits than Python converts (4,300)."""
    try:
        return _check_nesting(tomllib.loads(text), where)
    except RecursionError:
        raise ConfigError(f"{where}: arrays or tables nested too deeply (at most {MAX_NESTING} levels)") from None
    except ValueError as exc:
        if isinstance(exc, tomllib.TOMLDecodeError):
            raise
        raise ConfigError(f"{where}: {str(exc).strip().splitlines()[0]}") from None


def _check_nesting(value: Any, where: str, depth: int = 0) -> Any:
    if depth > MAX_NESTING:
        raise ConfigError(f"{where}: arrays or tables nested too deeply (at most {MAX_NESTING} levels)")
    if isinstance(value, dict):
        for v in value.values():
            _check_nesting(v, where, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_nesting(v, where, depth + 1)
    return value


def parse_value(text: str) -> Any:
    """A ``--set`` value read as a TOML literal (``3``, ``1e-3``, ``true``, ``[256, 128]``), else a string."""
    try:
        return _parse_toml(f"v = {text}", "override")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``key=value`` (dotted key: ``train.epochs=5``) to the raw recipe dict, in place."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' is not of the form key=value")
    key, text = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override key '{key}' is malformed")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = parse_value(text.strip())


def read_recipe(path: str | Path) -> dict:
    """The raw dict of a TOML recipe; a syntax error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' does not exist")
    try:
        return _parse_toml(path.read_text(encoding="utf-8-sig"), str(path))  # (an editor's byte-order mark is no error)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None


def config_from_dict(raw: dict) -> Config:
    """Check a raw recipe dict and return a :class:`Config` (model options checked by the registry)."""
    raw = dict(raw)
    kwargs: dict[str, Any] = {}
    top = _field_types(Config)
    for key, value in raw.items():
        if key not in top:
            raise unknown_key(key, list(top))
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' must be a [{key}] section")
            kwargs[key] = build_dataclass(_SECTIONS[key], value, where=f"{key}.")
        elif key == "options":
            if not isinstance(value, dict):
                raise ConfigError("'options' must be an [options] section")
            kwargs[key] = dict(value)
        else:
            kwargs[key] = coerce(value, top[key], key)
    return Config(**kwargs)


def load_config(recipe: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """A checked :class:`Config` from a recipe file (or a raw dict ``base``) and ``key=value`` overrides."""
    raw = read_recipe(recipe) if recipe is not None else dict(base or {})
    for assignment in overrides:
        apply_override(raw, assignment)
    return config_from_dict(raw)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def dumps(config: Config) -> str:
    """The fully resolved config as TOML (``None`` values are left out: they are the defaults)."""
    data = config.to_dict()
    lines = []
    for key, value in data.items():
        if not isinstance(value, dict) and value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for section in ("data", "train", "options"):
        lines.append(f"\n[{section}]")
        for key, value in data[section].items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
