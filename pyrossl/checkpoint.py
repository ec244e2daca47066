"""A run folder's training state: what a resume checks and reads, ``checkpoint.pt``, ``best.pt`` and
the ``metrics.jsonl`` records, for the training loop (:mod:`pyrossl.train`).

``checkpoint.pt`` holds the entry's parameters, the optimiser's state, every random state the loop
draws from (one per process of a job: each draws its own sampling noise), the :class:`Progress`
counters and, for a checkpoint written inside an epoch, where it stopped (``partial``). Taken at
the end of an epoch or at a step boundary, it lets a resumed run end with the numbers of an
uninterrupted one. Every file is written atomically (:mod:`pyrossl.files`): a kill loses at most the
steps since the last checkpoint. Rank 0 alone writes.
"""

from __future__ import annotations

import errno
import math
import random
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pyrossl import distributed, runs
from pyrossl.config import Config, dotted
from pyrossl.errors import CheckpointError, ProcessLost, PyrosslError, WriteError
from pyrossl.registry import model_class, resolve

#: settings of where and how visibly a run computes, not of what it computes: they may change on resume
# plugins say where the code of an entry or guide comes from; the model and guide names are compared.
# Evaluation draws from its own random stream (pyrossl.scoring): how often and how much is evaluated
# never changes what is trained, so those settings may change on resume too
RUNTIME_KEYS = {
    "device",
    "threads",
    "train.progress",
    "train.eval_batch_size",
    "train.checkpoint_every",
    "plugins",
    "train.eval_every",
    "train.eval_test",
    "train.diagnose_every",
    "train.iwae_samples",
    "train.figures",
    "train.loggers",  # where the numbers are mirrored, not what they are
    "train.tracking_uri",
    "train.experiment",
    "train.patience",  # when to stop, not what an epoch computes: a run stopped early goes on with a larger one
}

#: what a torch or Python error reading a damaged state raises
DAMAGED = (KeyError, RuntimeError, ValueError, TypeError, IndexError)


@dataclass
class Progress:
    """The loop's counters, as ``checkpoint.pt`` keeps them (``counters``)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimisation steps taken (skipped ones included)
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (train.on_nonfinite = "skip")
    seconds: float = 0.0  # training time so far, resumed runs included
    best_epoch: int = 0  # the epoch of best.pt
    best_score: float = -math.inf  # its validation score
    stale: int = 0  # evaluated epochs since the best one (train.patience stops the run at that many)

    @classmethod
    def from_counters(cls, counters: dict) -> Progress:
        return cls(
            int(counters["epoch"]),
            int(counters["step"]),
            int(counters["skipped"]),
            float(counters["seconds"]),
            int(counters["best_epoch"]),
            float(counters["best_score"]),
            int(counters.get("stale", 0)),  # a checkpoint from before early stopping: no count
        )


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG state training draws from, as plain tensors and containers (``weights_only`` loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "data": generator.get_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_progress(state: dict, epochs: int, path: Path) -> None:
    """The counters of a checkpoint, and its position inside an epoch (``partial``), checked for type
    and range against a run of ``epochs`` epochs before a resume uses (or writes) anything: a damaged
    or foreign file is one line, never steps replayed or skipped."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{path}: {what}: the file is damaged or not this run's")

    def whole(value, low: int, high: float = math.inf) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    def finite(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def real(value) -> bool:  # a duration
        return finite(value) and value >= 0

    c = state["counters"]
    need(isinstance(c, dict), "'counters' is not a table")
    need(whole(c.get("epoch"), 0, epochs), f"counters.epoch is {c.get('epoch')!r}, not 0 .. {epochs}")
    need(whole(c.get("step"), 0), f"counters.step is {c.get('step')!r}, not a count")
    need(whole(c.get("skipped"), 0, c["step"]), f"counters.skipped is {c.get('skipped')!r}, not 0 .. {c['step']}")
    need(
        whole(c.get("best_epoch"), 0, c["epoch"]),
        f"counters.best_epoch is {c.get('best_epoch')!r}, not 0 .. {c['epoch']}",
    )
    need(real(c.get("seconds")), f"counters.seconds is {c.get('seconds')!r}, not a duration")
    need(whole(c.get("stale", 0), 0, c["epoch"]), f"counters.stale is {c.get('stale')!r}, not 0 .. {c['epoch']}")
    score = c.get("best_score")
    need(
        isinstance(score, (int, float)) and not isinstance(score, bool) and not math.isnan(score),
        f"counters.best_score is {score!r}, not a score",
    )
    partial = state.get("partial")
    if partial is None:
        return
    need(isinstance(partial, dict), "'partial' is not a table")
    need(
        partial.get("epoch") == c["epoch"] + 1 <= epochs and whole(partial.get("epoch"), 1),
        f"partial.epoch is {partial.get('epoch')!r}, not the epoch after counters.epoch ({c['epoch'] + 1})",
    )
    need(whole(partial.get("batch"), 1), f"partial.batch is {partial.get('batch')!r}, not a batch count")
    losses = partial.get("losses")
    need(
        isinstance(losses, list) and len(losses) <= partial["batch"] and all(finite(v) for v in losses),
        "partial.losses is not a list of at most partial.batch finite numbers",
    )
    rng = partial.get("data_rng")
    need(
        isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.Generator().get_state().shape,
        "partial.data_rng is not the state of a torch generator",
    )
    need(
        real(partial.get("train_seconds")), f"partial.train_seconds is {partial.get('train_seconds')!r}, not a duration"
    )


def config_differences(saved: Config, new: Config) -> list[str]:
    """The keys in which ``new`` (resolved) computes something else than the run's ``saved`` config:
    every key but :data:`RUNTIME_KEYS` (and, under the plateau schedule, ``train.eval_every`` counts:
    the evaluated epochs step the learning rate)."""
    # resolved, so a run written before a key existed compares equal with that key's default
    a, b = dotted(resolve(saved).to_dict()), dotted(new.to_dict())
    runtime = RUNTIME_KEYS - ({"train.eval_every"} if new.train.lr_schedule == "plateau" else set())
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in runtime]


class RunCheckpoints:
    """The training state of the run folder ``out`` for ``config`` (resolved); ``writer``: this process
    writes (rank 0). Holds what a resume read until the loop takes it (:meth:`restore`)."""

    def __init__(self, out: Path, config: Config, writer: bool = True):
        self.out, self.config, self.writer = Path(out), config, writer
        self.path, self.best_path = self.out / runs.CHECKPOINT, self.out / runs.BEST
        self.saved_epoch: int | None = None  # the epoch of the last checkpoint this process wrote or read
        self.records_kept: list[dict] | None = None  # on a resume: the metrics records up to the checkpoint's epoch
        self._state = None  # checkpoint.pt as check_resumable read it, for restore
        self.extended_from: int | None = None  # a resume asking more epochs than the run's: the run's count

    def check_resumable(self) -> None:
        """Before any data is loaded: the config equals the run's (but for :data:`RUNTIME_KEYS`), and every
        file the resumed run reads is read now, so that a damaged one is named at once."""
        saved_config = runs.read_config(self.out)
        diff = config_differences(saved_config, self.config)
        if "train.epochs" in diff:  # a run may be extended, never shortened
            before, after = saved_config.train.epochs, self.config.train.epochs
            if after < before:
                raise CheckpointError(
                    f"cannot resume {self.out} with train.epochs = {after}: the run has {before} epochs, and a "
                    "resume may only add epochs"
                )
            diff.remove("train.epochs")
            self.extended_from = before
        if diff:
            raise CheckpointError(f"cannot resume {self.out}: its config differs in {', '.join(diff)}")
        runs.read_metrics(self.out)
        cls = model_class(self.config.model)
        cls.read_outputs(runs.RunFiles(self.out), cls.make_options(self.config.options))
        if self.path.exists():
            self._state = runs.load_checkpoint(self.path, keys=("model", "optimizer", "rng", "counters"))
            check_progress(self._state, self.config.train.epochs, self.path)
        if self.best_path.exists():
            try:
                runs.load_checkpoint(self.best_path, keys=("model",))
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; delete it to resume with the last epoch as the best one") from None

    def start(self, resume: bool) -> bool:
        """Prepare the folder (rank 0): a resume clears what an interrupted write left; a new run writes
        its config and an empty metrics file. True when there is a checkpoint to :meth:`restore`."""
        if resume and self.writer:
            runs.remove_stale_temporaries(self.out)
            if self.extended_from is not None:  # the recorded config, with only its epochs changed
                recorded = runs.read_config(self.out)
                epochs = self.config.train.epochs
                runs.write_config(self.out, replace(recorded, train=replace(recorded.train, epochs=epochs)))
        if resume and self.path.exists():
            return True
        if self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            runs.write_config(self.out, self.config)
            runs.write_metrics(self.out, [])
        return False

    def restore(
        self, model, optimizer, generator: torch.Generator, scheduler=None
    ) -> tuple[Progress, dict | None, list | None]:
        """Load ``checkpoint.pt`` into the entry, the optimiser, the learning-rate schedule and the random
        states: its counters, where a mid-epoch checkpoint stopped (``partial``) and every process's random
        state (``rng_ranks``)."""
        # RNG states must stay CPU tensors; load_state_dict moves parameters and optimiser state
        state, self._state = self._state, None
        state = runs.load_parameters(model, self.path, map_location="cpu", state=state)
        try:
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and "scheduler" in state:
                scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"], generator)
            progress = Progress.from_counters(state["counters"])
        except DAMAGED as exc:
            raise CheckpointError(
                f"{self.path} does not match this model ({str(exc).strip().splitlines()[0]})"
            ) from None
        self.saved_epoch = progress.epoch
        # epochs after the checkpoint never happened, as far as the resumed run is concerned: their records
        # go when the first resumed epoch writes its own (a resume that fails before that changes no file)
        self.records_kept = (
            [r for r in runs.read_metrics(self.out) if r["epoch"] <= progress.epoch] if self.writer else None
        )
        return progress, state.get("partial"), state.get("rng_ranks")

    def restore_process_rng(self, ranks: list | None, dist, generator: torch.Generator) -> bool:
        """This process's random state from a checkpoint of a job of as many processes; False when there
        is none to take (a fresh run, or another number of processes: the streams start anew)."""
        if ranks is None or len(ranks) != dist.world_size:
            return False
        try:
            set_rng_state(ranks[dist.rank], generator)
        except DAMAGED as exc:
            raise CheckpointError(
                f"{self.path}: its random state of process {dist.rank} is damaged ({str(exc).strip().splitlines()[0]})"
            ) from None
        return True

    def save(
        self,
        model,
        optimizer,
        generator: torch.Generator,
        progress: Progress,
        dist,
        partial: dict | None = None,
        scheduler=None,
    ) -> None:
        """Write ``checkpoint.pt`` (``partial``: the position inside an unfinished epoch). Every process
        calls it: each one's random state is gathered for an exact resume; rank 0 writes."""
        ranks = distributed.gather_object(rng_state(generator)) if dist.active else None
        if not self.writer:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(generator),
            "counters": asdict(progress),
        }
        if scheduler is not None:  # the learning-rate schedule's position (train.lr_schedule)
            state["scheduler"] = scheduler.state_dict()
        if partial is not None:
            state["partial"] = partial
        if ranks is not None:
            state["rng_ranks"] = ranks
        runs.atomic_save(state, self.path)
        self.saved_epoch = progress.epoch

    def save_best(self, model, epoch: int) -> None:
        if self.writer:
            runs.atomic_save({"model": model.state_dict(), "epoch": epoch}, self.best_path)

    def has_best(self) -> bool:
        """Whether ``best.pt`` exists, as rank 0 sees it, on every process."""
        return distributed.broadcast_object(self.best_path.exists() if self.writer else None)

    def load_best(self, model, device) -> None:
        """The parameters of ``best.pt`` into ``model`` on every process (rank 0 reads, the others receive)."""
        if self.writer:
            runs.load_parameters(model, self.best_path, map_location=device)
        distributed.broadcast_state(model)

    def record(self, record: dict | None = None) -> None:
        """Append an epoch's record to ``metrics.jsonl``; the first one after a resume rewrites the file
        with the records up to the checkpoint first. Without a record: only that rewrite, if pending."""
        if not self.writer:
            return
        if self.records_kept is not None:
            runs.write_metrics(self.out, [*self.records_kept, *([record] if record else [])])
            self.records_kept = None
        elif record is not None:
            runs.append_metrics(self.out, record)

    def write_failed(self, exc: WriteError) -> CheckpointError:
        """A failed write of any run file, in one line: what failed, the checkpoint that is kept, how to go on."""
        if not self.out.is_dir():
            return CheckpointError(f"{exc}: the run directory {self.out} was removed while it trained")
        kept = (
            "no checkpoint was written yet"
            if self.saved_epoch is None
            else f"the previous checkpoint is intact (epoch {self.saved_epoch})"
        )
        fix = "free space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        return CheckpointError(f"{exc}; {kept}: {fix}, then resume with pyrossl train --resume {self.out}")

    def peer_lost(self, exc: RuntimeError, dist) -> ProcessLost:
        """Another process of the job died (killed, out of memory) while this one waited on it: the
        backend's trace goes to ``<run>/process<rank>-error.log``, this process says one line."""
        log = self.out / f"process{dist.rank}-error.log"
        try:
            runs.atomic_write_text(log, "".join(traceback.format_exception(exc)))
            where = f"the backend's trace is in {log}"
        except PyrosslError:
            where = "its trace could not be written"
        return ProcessLost(
            f"process {dist.rank} of {dist.world_size} stopped: another process of the job "
            f"ended while this one waited on it ({where}); the last checkpoint is intact: "
            f"resume with pyrossl train --resume {self.out} --nproc {dist.world_size}"
        )
