"""The run directory: what a training run leaves behind, and how to load it again.

::

    <run>/config.toml      the fully resolved config (re-runs the same experiment)
    <run>/metrics.jsonl    one JSON line per epoch
    <run>/summary.json     test metrics of the best (by validation) and of the last epoch
    <run>/checkpoint.pt    last epoch: parameters, optimiser, RNG states, counters (resume)
    <run>/best.pt          parameters of the best epoch
    <run>/figures/         PNG figures

Checkpoints hold plain tensors and containers only; they are written to a temporary file, flushed
and renamed (a crash never leaves a half-written one) and read with ``weights_only=True`` (loading
one never runs code).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyrossl.config import Config, dumps, load_config
from pyrossl.errors import CheckpointError, PyrosslError

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
FIGURES = "figures"


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    If anything fails (a full disk, a kill), ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def child(folder: Path, name: str) -> Path:
    """``folder / name`` where ``name`` comes from user input (a config value, a variant label): it
    must be one plain entry of ``folder``, so nothing is ever written outside it."""
    if not name or name in (".", "..") or Path(name).name != name or "/" in name or "\\" in name or "\0" in name:
        raise PyrosslError(f"{name!r} cannot name an entry of {folder}: it must be a plain file or folder name")
    return Path(folder) / name


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed write left in ``folder`` (never a finished file)."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()] if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint's dict, loaded with ``weights_only=True``: a file that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise CheckpointError(f"{path} is not a safe pyrossl checkpoint (refused to unpickle: {first})") from None
    except Exception as exc:  # garbage bytes fail in many ways inside the unpickler: all mean "not a checkpoint"
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {detail})") from None


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a line cut short by a kill: its epoch has no checkpoint either
                break
            raise CheckpointError(f"{path}: line {i + 1} is not JSON") from None
    return records


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in records))


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def write_config(run_dir: Path, config: Config) -> None:
    atomic_write_text(Path(run_dir) / CONFIG, dumps(config))


def read_summary(run_dir: Path) -> dict:
    """The run's ``summary.json``; empty while the run has not finished."""
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.exists() else {}


def read_config(run_dir: Path) -> Config:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG})")
    return load_config(run_dir / CONFIG)


def is_run(run_dir: Path) -> bool:
    return (Path(run_dir) / CONFIG).is_file()


@dataclass
class Run:
    """A finished (or stopped) run, restored for inspection: its config, data split and model.

    The model holds the parameters of the best epoch (``which="best"``) or of the last one.
    """

    path: Path
    config: Config
    model: torch.nn.Module
    dataset: object
    split: object
    metrics: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of one part of the split: labelled, unlabelled, validation, test, or train (labelled and unlabelled)."""
        if part == "train":
            index = torch.cat([self.split.unlabelled, self.split.labelled])
        else:
            index = getattr(self.split, part)
        return self.dataset.x[index].to(self.device), self.dataset.y[index].to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _call(self, what: str, *args):
        method = getattr(self.model, what, None)
        if method is None:
            raise PyrosslError(f"model '{self.config.model}' has no {what}()")
        try:
            with torch.no_grad():
                return method(*args)
        except NotImplementedError as exc:
            raise PyrosslError(f"model '{self.config.model}' has no {what}(): {exc}") from None

    def posterior(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The guide's beliefs about the images ``x``: ``y_probs`` (q(y|x)), ``z_loc``/``z_scale`` (q(z|x)),
        ``z`` (a point code), ``cluster_probs`` (p(c|z)) -- each model gives those it has."""
        return self._call("posterior", x.to(self.device))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The class of each image (for the unsupervised GMM-prior VAEs, its cluster)."""
        return self._call("predict", x.to(self.device))

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self._call("latent", x.to(self.device))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self._call("reconstruct", x.to(self.device))

    def sample(self, n: int, y=None) -> torch.Tensor:
        """``n`` images from the model; ``y`` (an int or one per image) picks the class where the model has classes."""
        if y is not None:
            y = torch.as_tensor(y, device=self.device).expand(n)
        return self._call("sample", n, y)

    def predictive(self, num_samples: int, return_sites=None, parallel: bool = False):
        """``pyro.infer.Predictive`` over the run's Pyro model with its trained guide.

        Call it with the model's arguments, e.g. ``run.predictive(10)(x)``: the result maps each
        latent site (``z``, ``y``, ...; ``return_sites`` may add observed ones) to ``num_samples``
        draws. Each draw runs the guide and replays the model on the guide's values. (Pyro's
        ``Predictive(model, guide=...)`` first runs the model alone, with values from the priors,
        to find its plates: that fails for a prior that cannot be sampled, such as the
        autoencoder's flat one.)
        """
        from pyro import poutine
        from pyro.infer import Predictive

        entry = self.model
        holder = entry.loss if hasattr(entry, "loss") else entry  # an ELBO module, or an entry with several
        model, guide = holder.model, holder.guide

        def guided_model(*args, **kwargs):
            with poutine.block():
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            return poutine.replay(model, trace=guide_trace)(*args, **kwargs)

        return Predictive(guided_model, num_samples=num_samples, return_sites=return_sites, parallel=parallel)


def load_run(path: str | Path, which: str = "best", device: str = "cpu") -> Run:
    """Restore a run directory: config, data and split (re-made from the seed), model with parameters.

    ``which`` is ``"best"`` (the epoch with the best validation score) or ``"last"``.
    """
    from pyrossl.registry import build_model

    if which not in ("best", "last"):
        raise PyrosslError(f"which must be 'best' or 'last', not {which!r}")
    path = Path(path)
    config = read_config(path)
    dataset = load_dataset_for(config)
    split = split_for(config, dataset)
    model = build_model(config, dataset.meta())
    state_file = path / (BEST if which == "best" else CHECKPOINT)
    if which == "best" and not state_file.exists():
        state_file = path / CHECKPOINT
    state = load_checkpoint(state_file)
    model.load_state_dict(state["model"])
    from pyrossl.train import resolve_device

    model.to(resolve_device(device)).eval()
    return Run(path, config, model, dataset, split, read_metrics(path), read_summary(path))


def load_dataset_for(config: Config):
    """The dataset a config names, with its data options."""
    from pyrossl.data import load_dataset

    d = config.data
    # source options travel only when set, so a source that lacks one is told so (and not silently ignored)
    options = {k: getattr(d, k) for k in ("path", "attributes", "image_size", "max_per_part", "num_examples") if getattr(d, k) is not None}
    return load_dataset(d.name, data_dir=d.data_dir, **options)


def split_for(config: Config, dataset):
    """The split a config asks for; the same on every call with the same seed (``data.split_seed``, else ``seed``)."""
    from pyrossl.data import make_split

    d = config.data
    as_count = lambda v: int(v) if v >= 1 else float(v)  # noqa: E731 (counts and fractions share a field)
    return make_split(
        dataset,
        labels_per_class=d.labels_per_class,
        label_fraction=d.label_fraction,
        validation=as_count(d.validation),
        test=as_count(d.test),
        seed=config.seed if d.split_seed is None else d.split_seed,
        limit_per_class=d.limit_per_class,
    )
