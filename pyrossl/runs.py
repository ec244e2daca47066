"""The run directory: what a training run leaves behind, each file written and read in one checked place.

::

    <run>/config.toml      the fully resolved config (re-runs the same experiment)
    <run>/metrics.jsonl    one JSON line per epoch
    <run>/summary.json     test metrics of the best (by validation) and of the last epoch
    <run>/checkpoint.pt    last epoch: parameters, optimiser, RNG states, counters (resume)
    <run>/best.pt          parameters of the best epoch
    <run>/figures/         PNG figures
    <run>/.lock            held (``fcntl.flock``) by the one process writing the run: :class:`RunLock`

Checkpoints hold plain tensors and containers only; they are written to a temporary file, flushed
and renamed (a crash never leaves a half-written one) and read with ``weights_only=True`` (loading
one never runs code). This module imports nothing of the zoo above the files, the config and the
data; a whole run restored with its model is :func:`pyrossl.run.load_run`, one layer up.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # numpy is imported where a table is read, not by every command
    import numpy as np

from pyrossl.config import Config, dumps, load_config, split_amount
from pyrossl.errors import CheckpointError, ConfigError, PyrosslError
from pyrossl.files import (  # noqa: F401
    LOCK,
    RunLock,
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
    prepare_output,
    refuse_symlink,
    remove_stale_temporaries,
    write_table,
)

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
FIGURES = "figures"


def child(folder: Path, name: str) -> Path:
    """``folder / name`` where ``name`` comes from user input (a config value, a variant label): it
    must be one plain entry of ``folder``, so nothing is ever written outside it."""
    if not name or name in (".", "..") or Path(name).name != name or "/" in name or "\\" in name or "\0" in name:
        raise PyrosslError(f"{name!r} cannot name an entry of {folder}: it must be a plain file or folder name")
    return Path(folder) / name


def _text(path: Path) -> str:
    """The text of a run file, or a CheckpointError that names it (unreadable, not UTF-8)."""
    try:
        return path.read_text()
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not a text (UTF-8) file (byte {exc.start})") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None


def _json_error(path: Path, exc: json.JSONDecodeError, line: int | None = None) -> CheckpointError:
    where = f"line {line}" if line is not None else f"line {exc.lineno}, column {exc.colno}"
    return CheckpointError(f"{path}: {where}: not JSON ({exc.msg})")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Census(pickle.Unpickler):
    """Reads a checkpoint's pickle without making anything in it: the globals it asks for (only what
    ``torch.save`` writes for tensors in plain containers is answered), its storages (size in bytes)
    and every tensor's view of one (offset, sizes, strides)."""

    def __init__(self, file):
        super().__init__(file)
        self.storages: dict[str, tuple[int, int]] = {}  # key -> (elements, bytes per element)
        self.views: list[tuple] = []

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._view
        if module == "torch" and name.endswith("Storage") and isinstance(getattr(torch, name, None), type):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        with warnings.catch_warnings():  # (the legacy storage classes torch.save names warn when touched)
            warnings.simplefilter("ignore")
            dtype = getattr(pid[1], "dtype", None) if isinstance(pid, tuple) and len(pid) == 5 else None
        if not (
            isinstance(dtype, torch.dtype)
            and pid[0] == "storage"
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
            and pid[4] >= 0
        ):
            raise pickle.UnpicklingError(f"a storage record of another form ({str(pid)[:80]})")
        key, numel, itemsize = pid[2], pid[4], dtype.itemsize
        self.storages[key] = (numel, itemsize)
        return key

    def _view(self, storage, offset, size, stride, *rest):
        self.views.append((storage, offset, size, stride))


class _Refused(Exception):
    """A global a checkpoint asks for that a checkpoint never needs."""


#: the most a checkpoint's pickle (the tables around its tensors) may take: far above any real one
MAX_PICKLE_BYTES = 64 << 20


def census(path: Path) -> None:
    """Refuse, cheaply and before anything is allocated, a checkpoint file that is not what
    ``torch.save`` writes for the zoo: a zip archive whose records are stored, not compressed (a
    compressed record expands to any size); whose pickle asks for nothing but tensors in plain
    containers (the refusal names what it asked for); whose storages are no larger than their records
    in the file; and whose tensors view only elements their storage holds. A CheckpointError naming
    the file and the fault."""
    import zipfile

    def refuse(why: str, kind: str = "readable") -> CheckpointError:
        return CheckpointError(f"{path} is not a {'safe pyrossl' if kind == 'safe' else kind} checkpoint ({why})")

    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            pickles = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(pickles) != 1:
                raise refuse("no data.pkl record")
            compressed = next((i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED), None)
            if compressed:
                raise refuse(f"its record {compressed} is compressed; torch.save never compresses")
            if pickles[0].file_size > MAX_PICKLE_BYTES:
                raise refuse(f"its data.pkl of {pickles[0].file_size} bytes is larger than any checkpoint's")
            folder = pickles[0].filename[: -len("data.pkl")]
            records = {
                i.filename[len(folder) + len("data/") :]: i.file_size
                for i in infos
                if i.filename.startswith(folder + "data/")
            }
            census = _Census(io.BytesIO(archive.read(pickles[0])))
            census.load()
    except CheckpointError:
        raise
    except _Refused as exc:
        raise refuse(f"refused to unpickle: it asks to import and call {exc}", kind="safe") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile):
        raise refuse("not a zip archive as torch.save writes") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # a damaged pickle fails in many ways (EOF, bad opcodes, wrong arguments)
        raise refuse(f"{type(exc).__name__}: {str(exc).strip()[:120]}") from None
    for key, (numel, itemsize) in census.storages.items():
        if key not in records or numel * itemsize > records[key]:
            raise refuse(f"storage {key} declares {numel * itemsize} bytes, its record holds {records.get(key, 0)}")
    for storage, offset, size, stride in census.views:
        if not (
            isinstance(storage, str)
            and storage in census.storages
            and isinstance(offset, int)
            and offset >= 0
            and isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(isinstance(n, int) and n >= 0 for n in (*size, *stride))
        ):
            raise refuse("a tensor record of another form")
        if 0 not in size and offset + sum((n - 1) * st for n, st in zip(size, stride)) >= census.storages[storage][0]:
            raise refuse(
                f"a tensor of shape {list(size)} views more elements than its storage {storage} holds "
                f"({census.storages[storage][0]})"
            )


def load_checkpoint(path: Path, map_location="cpu", keys: tuple[str, ...] = ()) -> dict:
    """A checkpoint's dict, loaded with ``weights_only=True``: a file that would run code is refused.

    ``keys`` must be present; the ``model`` entry must map parameter names to tensors without NaN (a
    damaged file can unpickle into numbers that are not the ones written: training never saves a
    NaN parameter, so such a file is refused here rather than drawn or evaluated).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    census(path)  # what the file asks for and how much it would allocate, before torch makes anything
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # garbage bytes fail in many ways inside the unpickler: all mean "not a checkpoint"
        detail = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {detail})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a pyrossl checkpoint (it holds a {type(state).__name__}, not a dict)")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a pyrossl checkpoint (no {', '.join(repr(k) for k in missing)})")
    if "model" in state:
        params = state["model"]
        if not isinstance(params, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in params.items()
        ):
            raise CheckpointError(f"{path}: its 'model' entry is not a dict of named tensors")
        # (infinities can be legitimate: the log-weight of an empty mixture component is -inf)
        bad = next((k for k, v in params.items() if v.is_floating_point() and torch.isnan(v).any()), None)
        if bad is not None:
            raise CheckpointError(f"{path}: parameter {bad!r} holds NaN (the file is damaged)")
    return state


def read_sources(sources: dict[str, str]) -> dict[str, tuple[Config, dict]]:
    """The finished runs an entry takes parts of (:meth:`pyrossl.zoo.ZooModel.source_runs`, ``{option:
    run directory}``), each as its recipe and the model state of its best checkpoint (the last where it
    has none). A path that is no run, or a run without a checkpoint, is a one-line ConfigError naming the
    option."""
    read = {}
    for option, where in sources.items():
        path = Path(where)
        if not is_run(path):
            raise ConfigError(f"options.{option}: {path} is not a run directory (no {CONFIG})")
        state = path / BEST if (path / BEST).exists() else path / CHECKPOINT
        if not state.exists():
            raise ConfigError(f"options.{option}: {path} has no checkpoint ({BEST} or {CHECKPOINT})")
        read[option] = (read_config(path), load_checkpoint(state, keys=("model",))["model"])
    return read


def load_parameters(model: torch.nn.Module, path: Path, map_location="cpu", state: dict | None = None) -> dict:
    """Load the ``model`` entry of the checkpoint ``path`` into ``model``; the checkpoint's dict.

    ``state``: that checkpoint already read by :func:`load_checkpoint` (it is not read again). A
    checkpoint of another model (names or shapes differ) is a CheckpointError that names the file.
    """
    if state is None:
        state = load_checkpoint(path, map_location=map_location, keys=("model",))
    own, theirs = model.state_dict(), state["model"]
    missing, unexpected = [k for k in own if k not in theirs], [k for k in theirs if k not in own]
    reshaped = [k for k in own if k in theirs and own[k].shape != theirs[k].shape]
    if missing or unexpected or reshaped:  # torch's own message is a page; its first line names nothing
        faults = [
            f"{len(missing)} of this model's tensors missing (first: {missing[0]})" if missing else "",
            f"{len(unexpected)} it does not have (first: {unexpected[0]})" if unexpected else "",
            f"{len(reshaped)} of another shape (first: {reshaped[0]}, {list(theirs[reshaped[0]].shape)} in the file, "
            f"{list(own[reshaped[0]].shape)} here)"
            if reshaped
            else "",
        ]
        raise CheckpointError(
            f"{path} does not match this {type(model).__name__}: {'; '.join(f for f in faults if f)} "
            f"(a checkpoint of another model, guide or options?)"
        )
    try:
        model.load_state_dict(theirs)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} does not match this model ({str(exc).strip().splitlines()[0]})") from None
    return state


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``metrics.jsonl``: one JSON object per evaluated epoch, with an integer ``epoch``.

    A last line cut short (a kill while it was appended) is dropped: its epoch has no checkpoint
    either, and a resumed run writes it again. Any other line that is not such an object is a
    CheckpointError naming the file and the line.
    """
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    lines = [(n, line) for n, line in enumerate(_text(path).splitlines(), 1) if line.strip()]
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise _json_error(path, exc, number) from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("epoch"), int)
            or isinstance(record["epoch"], bool)
            or record["epoch"] < 0
        ):
            raise CheckpointError(
                f"{path}: line {number}: not an epoch's record (a JSON object with an integer 'epoch')"
            )
        for key, value in record.items():
            numbers_ = value if isinstance(value, list) else [value]
            if key != "epoch" and not all(v is None or _is_number(v) for v in numbers_):
                raise CheckpointError(f"{path}: line {number}: '{key}' is not a number")
        records.append(record)
    epochs = [r["epoch"] for r in records]
    if any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise CheckpointError(f"{path}: the epochs are not increasing ({', '.join(map(str, epochs))})")
    return records


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in records))


def append_metrics(run_dir: Path, record: dict) -> None:
    """Add one epoch's record to ``metrics.jsonl``: the file is rewritten whole (atomically), so a
    kill leaves the records of before or of after, never a torn line (a few KB per run)."""
    path = Path(run_dir) / METRICS
    before = _text(path) if path.exists() else ""
    if before and not before.endswith("\n"):
        before += "\n"
    atomic_write_text(path, before + json.dumps(record) + "\n")


def write_config(run_dir: Path, config: Config) -> None:
    atomic_write_text(Path(run_dir) / CONFIG, dumps(config))


def read_table(path: Path, dtype=float, shape: tuple[int | None, ...] = (None,)) -> np.ndarray:
    """A whitespace-separated table a model keeps in its run directory (Serket's ``z_learn.txt``...).

    ``shape`` gives the size of each axis (None: any, at least one row); a value that is not a
    number, a ragged row or another shape is a CheckpointError naming the file (and the row).
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty file: said below, as an error
            table = np.loadtxt(path, dtype=dtype, ndmin=len(shape))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {str(exc).strip().splitlines()[0]}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not table.shape[0] or any(want is not None and got != want for got, want in zip(table.shape, shape)):
        want = " x ".join("any" if n is None else str(n) for n in shape)
        raise CheckpointError(f"{path}: a table of {' x '.join(map(str, table.shape))} values, not {want}")
    if table.dtype.kind == "f" and not np.isfinite(table).all():
        raise CheckpointError(f"{path}: holds values that are not finite numbers")
    return table


class RunFiles:
    """The tables an entry keeps in a run directory, as the entry sees them: names relative to the
    run, read and checked here (:func:`read_table`), written atomically (:func:`write_tables`). Entries
    get one of these instead of paths, so that no model touches the file system itself."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def path(self, name: str) -> Path:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise PyrosslError(f"{name!r} cannot name a file of a run: it must be a path inside it")
        return self.run_dir / name

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def table(self, name: str, shape: tuple[int | None, ...] = (None,), dtype=float) -> np.ndarray:
        return read_table(self.path(name), dtype=dtype, shape=shape)


def read_outputs(run_dir: str | Path, model) -> dict:
    """The tables the entry ``model`` kept in the run (Serket's codes before and after its rounds...),
    read and checked by its class: ``type(model).read_outputs`` on the run's :class:`RunFiles`."""
    return type(model).read_outputs(RunFiles(run_dir), model.options)


def write_tables(run_dir: Path, tables: dict) -> list[Path]:
    """Write an entry's tables (:meth:`~pyrossl.zoo.Entry.epoch_outputs`: ``{name: (array, format)}``,
    names relative to ``run_dir``), each atomically; returns the paths."""
    files, paths = RunFiles(run_dir), []
    for name, (table, fmt) in tables.items():
        path = files.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table(path, table, fmt)
        paths.append(path)
    return paths


#: what every finished run's summary.json holds, and the type each must have
SUMMARY_FIELDS = {
    "model": str,
    "guide": str,
    "dataset": str,
    "seed": int,
    "epochs": int,
    "best_epoch": int,
    "selection_metric": str,
    "seconds": (int, float),
    "best": dict,
    "last": dict,
}


def read_summary(run_dir: Path) -> dict:
    """The run's ``summary.json``; empty while the run has not finished.

    A file that is not JSON, or lacks a field of :data:`SUMMARY_FIELDS` (or has one of another
    type), is a CheckpointError naming the file (and the line, for a syntax error).
    """
    path = Path(run_dir) / SUMMARY
    if not path.exists():
        return {}
    try:
        summary = json.loads(_text(path))
    except json.JSONDecodeError as exc:
        raise _json_error(path, exc) from None
    if not isinstance(summary, dict):
        raise CheckpointError(f"{path}: not a run summary (a JSON object)")
    for key, kind in SUMMARY_FIELDS.items():
        value = summary.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: '{key}' is missing or not a {getattr(kind, '__name__', 'number')}")
    stopped = summary.get("stopped_early")
    if stopped is not None and not (
        isinstance(stopped, dict)
        and all(type(stopped.get(k)) is int for k in ("epoch", "best_epoch", "patience"))
        and isinstance(stopped.get("reason"), str)
    ):
        raise CheckpointError(f"{path}: 'stopped_early' is not a table of epoch, best_epoch, patience and reason")
    for part in ("best", "last"):
        bad = next(
            (k for k, v in summary[part].items() if not (v is None or _is_number(v) or isinstance(v, (str, list)))),
            None,
        )
        if bad is not None:
            raise CheckpointError(f"{path}: '{part}.{bad}' is not a number")
    return summary


def read_config(run_dir: Path) -> Config:
    """The run's resolved ``config.toml``; a damaged one is an error that names the file."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run directory (no {CONFIG})")
    try:
        return load_config(path)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if str(path) in message else f"{path}: {message}") from None


def is_run(run_dir: Path) -> bool:
    return (Path(run_dir) / CONFIG).is_file()


def load_dataset_for(config: Config):
    """The dataset a config names, with its data options."""
    from pyrossl.data import load_dataset

    d = config.data
    # source options travel only when set, so a source that lacks one is told so (and not silently ignored)
    options = {
        k: getattr(d, k)
        for k in ("path", "attributes", "image_size", "max_per_part", "num_examples")
        if getattr(d, k) is not None
    }
    return load_dataset(d.name, data_dir=d.data_dir, **options)


def split_for(config: Config, dataset):
    """The split a config asks for; the same on every call with the same seed (``data.split_seed``, else ``seed``)."""
    from pyrossl.data import make_split

    d = config.data
    return make_split(
        dataset,
        labels_per_class=d.labels_per_class,
        label_fraction=d.label_fraction,
        validation=split_amount("data.validation", d.validation),
        test=split_amount("data.test", d.test),
        seed=config.seed if d.split_seed is None else d.split_seed,
        limit_per_class=d.limit_per_class,
    )
