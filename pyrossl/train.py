"""The one training loop of the zoo.

Every entry is an ``nn.Module`` whose ``forward`` is its loss (see :mod:`pyrossl.zoo`); this loop
optimises it with ``torch.optim``, one step per batch of index tensors over in-memory data:

    for each epoch:  entry.start_epoch  ->  SVI steps (unlabelled batch [+ labelled batch])
                     ->  entry.end_epoch (non-SVI stages)  ->  evaluation on validation and test
                     ->  metrics.jsonl line, best.pt when validation improves, checkpoint.pt

A checkpoint holds every RNG state the loop draws from, taken at the end of an epoch, so a run
resumed from it ends with the same numbers as an uninterrupted run with the same seed (on CPU).
Ctrl-C (SIGINT) lets the current step finish, then writes a mid-epoch checkpoint (the position in the
epoch, its losses so far and the data generator's state at its start) and raises
:class:`~pyrossl.errors.TrainingInterrupted`; resuming replays the epoch's batch order and goes on
from the next step, to the same numbers. A kill (SIGKILL, power loss) loses at most the steps since
the last checkpoint: every file is written to a temporary file, flushed and renamed.
The summary reports the test metrics of the epoch with the best validation score (as Pyro's
SS-VAE example does) and of the last epoch.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from pyrossl import distributed, runs
from pyrossl.config import Config
from pyrossl.data.training import BatchSchedule, TrainingData
from pyrossl.distributed import resolve_device
from pyrossl.errors import (
    CheckpointError,
    ConfigError,
    ProcessLost,
    PyrosslError,
    TrainingError,
    WriteError,
)
from pyrossl.infer.params import module_local
from pyrossl.interrupt import StopRequest
from pyrossl.registry import build_model, model_class, resolve
from pyrossl.scoring import Scorer

#: glibc's ``mallopt`` parameters (malloc.h) and the values :func:`tune_allocator` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap, not from mmap
TRIM_THRESHOLD = 1 << 30  # freed heap memory is kept for the next step unless 1 GiB is free at its top


def tune_allocator() -> bool:
    """Let glibc's malloc keep the memory of one training step for the next (Linux, glibc; a process-wide
    setting, so the CLI calls it, not the library). Returns whether it changed anything.

    A CPU step allocates and frees the same few-MiB tensors every time. By default glibc serves such
    blocks with ``mmap`` or gives the top of its heap back to the system once more than a few MiB are
    free, so every step page-faults the same memory in again: on the M2 Fashion-MNIST recipe (one
    process) that was 5 s of system time in a run whose epoch took 33-34 s. With blocks up to 32 MiB on
    the heap and the heap trimmed only beyond 1 GiB free: 0.8 s, and the epoch 27-29 s; the peak
    memory stays within 2 %.
    ``PYROSSL_MALLOC=default`` (or malloc settings of your own in ``GLIBC_TUNABLES``) leaves malloc as it is.
    """
    if os.environ.get("PYROSSL_MALLOC", "tuned") == "default" or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def seed_everything(seed: int) -> None:
    pyro.set_rng_seed(seed)  # torch, numpy and random


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
    need(whole(c.get("best_epoch"), 0, c["epoch"]), f"counters.best_epoch is {c.get('best_epoch')!r}, not 0 .. {c['epoch']}")
    need(real(c.get("seconds")), f"counters.seconds is {c.get('seconds')!r}, not a duration")
    score = c.get("best_score")
    need(isinstance(score, (int, float)) and not isinstance(score, bool) and not math.isnan(score),
         f"counters.best_score is {score!r}, not a score")
    partial = state.get("partial")
    if partial is None:
        return
    need(isinstance(partial, dict), "'partial' is not a table")
    need(partial.get("epoch") == c["epoch"] + 1 <= epochs and whole(partial.get("epoch"), 1),
         f"partial.epoch is {partial.get('epoch')!r}, not the epoch after counters.epoch ({c['epoch'] + 1})")
    need(whole(partial.get("batch"), 1), f"partial.batch is {partial.get('batch')!r}, not a batch count")
    losses = partial.get("losses")
    need(isinstance(losses, list) and len(losses) <= partial["batch"] and all(finite(v) for v in losses),
         "partial.losses is not a list of at most partial.batch finite numbers")
    rng = partial.get("data_rng")
    need(isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.Generator().get_state().shape,
         "partial.data_rng is not the state of a torch generator")
    need(real(partial.get("train_seconds")), f"partial.train_seconds is {partial.get('train_seconds')!r}, not a duration")


def check_iwae_memory(k: int, images: int, pixels: int, device: torch.device, name: str) -> None:
    """The IWAE bound holds k samples of about 100 images at a time, each a decoded image and a few
    tensors of its size (float32: the image, its logits, log-probabilities, a temporary): a ConfigError
    naming the setting ``name`` when that is more than the device's memory."""
    images = min(100, images)
    if not k or not images:
        return
    need = k * images * pixels * 4 * 4
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[1]
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # a system that does not say: nothing to check against
            return
    if need > have:
        raise ConfigError(f"{name} = {k} needs about {need / 2**30:.0f} GiB for the IWAE bound ({images} images x {k} "
                          f"samples x {pixels} pixels), more than the {have / 2**30:.0f} GiB of this {device.type}: lower it")


def make_optimizer(config: Config, params) -> torch.optim.Optimizer:
    t = config.train
    choices = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if t.optimizer not in choices:
        raise ConfigError(f"unknown optimizer '{t.optimizer}' (valid: {', '.join(choices)})")
    params = list(params)
    # the fused kernels update every tensor in one pass: on CPU, Adam's step on M2's 1.3 M parameters
    # drops from about 5 ms to 0.5 ms (the per-tensor loop is PyTorch's CPU default); same update rule
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return choices[t.optimizer](params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)


def check_train_config(config: Config) -> None:
    t = config.train
    if t.epochs < 1:
        raise ConfigError(f"train.epochs must be at least 1, not {t.epochs}")
    for key in ("batch_size", "eval_batch_size", "eval_every", "checkpoint_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, not {getattr(t, key)}")
    if t.labelled_batch_size is not None and t.labelled_batch_size < 1:
        raise ConfigError(f"train.labelled_batch_size must be at least 1, not {t.labelled_batch_size}")
    if t.labelled_every < 1:
        raise ConfigError(f"train.labelled_every must be at least 1, not {t.labelled_every}")
    if not t.lr > 0:
        raise ConfigError(f"train.lr must be positive, not {t.lr}")
    if t.iwae_samples < 0:
        raise ConfigError(f"train.iwae_samples must be 0 (off) or positive, not {t.iwae_samples}")
    if t.clip_norm is not None and not t.clip_norm > 0:
        raise ConfigError(f"train.clip_norm must be positive (or left out), not {t.clip_norm}")
    if config.threads is not None and config.threads < 1:
        raise ConfigError(f"threads must be at least 1, not {config.threads}")
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite must be 'stop' or 'skip', not '{t.on_nonfinite}'")
    for key, seed in (("seed", config.seed), ("data.split_seed", config.data.split_seed)):
        if seed is not None and not 0 <= seed < 2**32:  # what torch, numpy and random all take
            raise ConfigError(f"{key} must be in 0 .. 2**32 - 1, not {seed}")
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay must be 0 or positive, not {t.weight_decay}")
    if t.particles < 1:
        raise ConfigError(f"train.particles must be at least 1, not {t.particles}")
    check_data_config(config)


def check_data_config(config: Config) -> None:
    """The data section's numbers, checked before any data is loaded: hold-outs are fractions in
    [0, 1) or whole counts, counts are non-negative (limits and generated sizes at least 1)."""
    d = config.data
    runs.split_amount("data.validation", d.validation)
    runs.split_amount("data.test", d.test)
    if d.labels_per_class is not None and d.labels_per_class < 0:
        raise ConfigError(f"data.labels_per_class must be 0 (no labels) or more, not {d.labels_per_class}")
    if d.label_fraction is not None and not 0 <= d.label_fraction <= 1:
        raise ConfigError(f"data.label_fraction must be a fraction in [0, 1], not {d.label_fraction}")
    for key in ("limit_per_class", "num_examples", "max_per_part", "image_size"):
        value = getattr(d, key)
        if value is not None and value < 1:
            raise ConfigError(f"data.{key} must be at least 1 (or left out), not {value}")


#: settings of where and how visibly a run computes, not of what it computes: they may change on resume
# plugins say where the code of an entry or guide comes from; the model and guide names are compared
# evaluation draws from its own random stream (separate_randomness): how often and how much is evaluated
# never changes what is trained, so those settings may change on resume too
RUNTIME_KEYS = {"device", "threads", "train.progress", "train.eval_batch_size", "train.checkpoint_every", "plugins",
                "train.eval_every", "train.iwae_samples"}


class Trainer:
    """Trains one config into one run directory (``resume=True`` continues from its checkpoint)."""

    def __init__(self, config: Config, out: str | Path, resume: bool = False):
        self.config = resolve(config)
        check_train_config(self.config)
        self.out = Path(out)
        self.resume = resume
        self._resume_state = None  # checkpoint.pt as _check_resumable read it, for _restore
        self.lock = None
        if resume and not runs.is_run(self.out):
            raise CheckpointError(f"cannot resume: {self.out} is not a run directory (no {runs.CONFIG})")
        if distributed.environment().rank == 0:
            runs.prepare_output(self.out)  # before any data is loaded: an --out that cannot be written fails now
            # the run's one writer from here to the end of fit(); what is checked below is checked under the lock
            self.lock = runs.RunLock(self.out, "pyrossl train" + (" --resume" if resume else "")).acquire()
        try:
            if resume:
                self._check_resumable()
            elif (self.out / runs.CHECKPOINT).exists():
                raise CheckpointError(f"{self.out} already holds a run: resume it with --resume {self.out}, or choose another --out")
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give up the run directory's lock (fit() does, however it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _check_resumable(self) -> None:
        # resolved, so a run written before a key existed compares equal with that key's default
        saved_d, new_d = _flat(resolve(runs.read_config(self.out)).to_dict()), _flat(self.config.to_dict())
        diff = [k for k in sorted(set(saved_d) | set(new_d)) if saved_d.get(k) != new_d.get(k) and k not in RUNTIME_KEYS]
        if diff:
            raise CheckpointError(f"cannot resume {self.out}: its config differs in {', '.join(diff)}")
        # every file the resumed run reads, read now (before any data is loaded) so a damaged one is named at once
        runs.read_metrics(self.out)
        cls = model_class(self.config.model)
        cls.read_outputs(runs.RunFiles(self.out), cls.make_options(self.config.options))
        if (self.out / runs.CHECKPOINT).exists():
            self._resume_state = runs.load_checkpoint(self.out / runs.CHECKPOINT, keys=("model", "optimizer", "rng", "counters"))
            check_progress(self._resume_state, self.config.train.epochs, self.out / runs.CHECKPOINT)
        if (self.out / runs.BEST).exists():
            try:
                runs.load_checkpoint(self.out / runs.BEST, keys=("model",))
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; delete it to resume with the last epoch as the best one") from None

    # ------------------------------------------------------------------------------------
    def setup(self) -> None:
        c = self.config
        device = resolve_device(c.device)
        self.dist = distributed.setup(device)
        self.device = distributed.device_for(device)
        self.writer = distributed.is_writer()
        if c.threads:
            torch.set_num_threads(c.threads)
        elif self.dist.active and self.device.type == "cpu":  # share the cores between this machine's processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        seed_everything(c.seed)
        self.dataset = runs.load_dataset_for(c)
        self.split = runs.split_for(c, self.dataset)
        if self.split.unlabelled.numel() + self.split.labelled.numel() == 0:
            raise ConfigError("the split leaves no training examples")
        self.data = TrainingData.on_device(self.dataset, self.split, c.data.binarize, c.seed, self.device)
        self.model = build_model(c, self.dataset.meta()).to(self.device)
        t = c.train
        self.schedule = BatchSchedule(self.split, t.batch_size, t.labelled_batch_size, t.labelled_every,
                                      self.model.uses_labels, self.model.uses_unlabelled, c.model)
        self.scorer = Scorer(self.model, self.data, self.dist, self.device, c.seed, t.eval_batch_size, t.iwae_samples)
        self._check_split()
        self._check_evaluation_memory()
        self.model.prepare(self.data.training_tensors)
        self.optimizer = make_optimizer(c, self.model.parameters())
        self.generator = torch.Generator().manual_seed(c.seed)
        self.epoch = 0
        self.step = 0
        self.seconds = 0.0
        self.skipped = 0
        self.best_epoch = 0
        self.best_score = -math.inf
        self.saved_epoch = None  # the epoch of the last checkpoint this process wrote
        self.records_kept = None  # on a resume: the metrics records up to the checkpoint's epoch
        self._rank_states = None  # on a resume: every process's random state at the checkpoint
        self.partial = None  # where a mid-epoch checkpoint stopped: {"epoch", "batch", "losses", "data_rng", ...}
        self.stop = StopRequest()  # a signal asking training to stop after the current step
        if self.resume and self.writer:
            runs.remove_stale_temporaries(self.out)
        if self.resume and (self.out / runs.CHECKPOINT).exists():
            self._restore()
        elif self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            runs.write_config(self.out, c)
            runs.write_metrics(self.out, [])
        self.loss_module = self.model
        if self.dist.active:
            # gradients averaged over the processes; the entry itself stays what checkpoints hold
            self.loss_module = distributed.wrap(self.model, self.device, self._has_unused_parameters())
            # each process draws its own sampling noise; the data generator (the batch order) is shared.
            # A resume on as many processes as wrote the checkpoint takes up each one's streams where they
            # were; on another number of processes the streams start anew (the run goes on, not bit for bit)
            ranks = self._rank_states
            if ranks is not None and len(ranks) == self.dist.world_size:
                try:
                    set_rng_state(ranks[self.dist.rank], self.generator)
                except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
                    raise CheckpointError(f"{self.out / runs.CHECKPOINT}: its random state of process {self.dist.rank} "
                                          f"is damaged ({str(exc).strip().splitlines()[0]})") from None
            else:
                pyro.set_rng_seed(int(np.random.SeedSequence([c.seed, self.epoch, self.dist.rank, self.dist.world_size]).generate_state(1)[0]))
            distributed.barrier()  # rank 0 has written the run directory

    def _check_split(self) -> None:
        """Each part of the split holds at least what its consumers need, said before any step."""
        for part, key in (("validation", "data.validation"), ("test", "data.test")):
            n = getattr(self.split, part).numel()
            if n == 1:  # 0 turns the part off; the latent figure projects a part onto 2 principal components
                raise ConfigError(f"{key} leaves 1 {part} example: at least 2 are needed (or 0 for none)")
        self.model.check_split(self.split, self.dataset)

    def _check_evaluation_memory(self) -> None:
        """An IWAE k (``train.iwae_samples``) this machine cannot hold is said now, not after training."""
        check_iwae_memory(self.config.train.iwae_samples, self.split.test.numel(), self.dataset.num_features,
                          self.device, "train.iwae_samples")

    def _restore(self) -> None:
        # RNG states must stay CPU tensors; load_state_dict moves parameters and optimiser state
        path = self.out / runs.CHECKPOINT
        state, self._resume_state = self._resume_state, None
        state = runs.load_parameters(self.model, path, map_location="cpu", state=state)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"], self.generator)
            counters = state["counters"]
            self.epoch, self.step, self.skipped = int(counters["epoch"]), int(counters["step"]), int(counters["skipped"])
            self.seconds = float(counters["seconds"])
            self.best_epoch, self.best_score = int(counters["best_epoch"]), float(counters["best_score"])
            self.saved_epoch = self.epoch
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{path} does not match this model ({str(exc).strip().splitlines()[0]})") from None
        self.partial = state.get("partial")
        self._rank_states = state.get("rng_ranks")
        # epochs after the checkpoint never happened, as far as the resumed run is concerned: their records
        # go when the first resumed epoch writes its own (a resume that fails before that changes no file)
        self.records_kept = [r for r in runs.read_metrics(self.out) if r["epoch"] <= self.epoch] if self.writer else None

    def _checkpoint(self, partial: dict | None = None) -> None:
        """Write ``checkpoint.pt`` (``partial``: the position inside an unfinished epoch); rank 0 alone writes."""
        # each process draws its own sampling noise: every one's random state is kept, for an exact resume
        ranks = distributed.gather_object(rng_state(self.generator)) if self.dist.active else None
        if not self.writer:
            return
        counters = {
            "epoch": self.epoch, "step": self.step, "skipped": self.skipped, "seconds": self.seconds,
            "best_epoch": self.best_epoch, "best_score": self.best_score,
        }
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "rng": rng_state(self.generator), "counters": counters}
        if partial is not None:
            state["partial"] = partial
        if ranks is not None:
            state["rng_ranks"] = ranks
        runs.atomic_save(state, self.out / runs.CHECKPOINT)
        self.saved_epoch = self.epoch

    def _peer_lost(self, exc: RuntimeError) -> ProcessLost:
        """Another process of the job died (killed, out of memory) while this one waited on it: the
        backend's trace goes to ``<run>/process<rank>-error.log``, this process says one line."""
        import traceback

        log = self.out / f"process{self.dist.rank}-error.log"
        try:
            runs.atomic_write_text(log, "".join(traceback.format_exception(exc)))
            where = f"the backend's trace is in {log}"
        except PyrosslError:
            where = "its trace could not be written"
        return ProcessLost(f"process {self.dist.rank} of {self.dist.world_size} stopped: another process of the job "
                           f"ended while this one waited on it ({where}); the last checkpoint is intact: "
                           f"resume with pyrossl train --resume {self.out} --nproc {self.dist.world_size}")

    def _write_failed(self, exc: WriteError) -> CheckpointError:
        """A failed write of any run file, in one line: what failed, the checkpoint that is kept, how to go on."""
        if not self.out.is_dir():
            return CheckpointError(f"{exc}: the run directory {self.out} was removed while it trained")
        kept = "no checkpoint was written yet" if self.saved_epoch is None else \
            f"the previous checkpoint is intact (epoch {self.saved_epoch})"
        fix = "free space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        return CheckpointError(f"{exc}; {kept}: {fix}, then resume with pyrossl train --resume {self.out}")

    # ------------------------------------------------------------------------------------
    def _loss(self, module: torch.nn.Module, unlab: torch.Tensor | None, lab: torch.Tensor | None) -> torch.Tensor:
        """The loss of ``module`` (the entry, or its DDP wrapper) on one step's index batches; an entry
        that ``wants_index`` also gets the unlabelled images' dataset indices."""
        x, _ = self.data.inputs(unlab)
        x_lab, y_lab = self.data.inputs(lab)
        if self.model.wants_index and unlab is not None:
            return module(x, x_lab, y_lab, index=unlab.to(self.device))
        return module(x, x_lab, y_lab)

    def _has_unused_parameters(self) -> bool:
        """Whether a step leaves some trainable parameter without a gradient (DDP must then look for them
        every step): one trial step of each kind on a few training examples, whose side effects are undone."""
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        params = [p for p in self.model.parameters() if p.requires_grad]
        unused = False
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for step in self.schedule.first_steps(self.generator):
                loss = self._loss(self.model, *(b[:2] if b is not None else None for b in step))
                unused |= any(g is None for g in torch.autograd.grad(loss, params, allow_unused=True))
        self.model.load_state_dict(saved)
        return unused

    def _shard(self, unlab, lab):
        """This process's share of a global step, and the weight of its loss (see :func:`distributed.loss_scale`)."""
        if not self.dist.active:
            return unlab, lab, 1.0
        main = unlab if unlab is not None else lab
        local_unlab, local_lab = distributed.shard(unlab), distributed.shard(lab)
        local_main = local_unlab if unlab is not None else local_lab
        scale = distributed.loss_scale(local_main.numel(), main.numel())
        if local_main.numel() == 0:  # fewer examples than processes: compute on the whole batch, weighted 0
            return unlab, lab, scale
        if local_lab is not None and local_lab.numel() == 0:
            local_lab = None
        return local_unlab, local_lab, scale

    def _step(self, unlab, lab) -> float | None:
        unlab, lab, scale = self._shard(unlab, lab)
        loss = self._loss(self.loss_module, unlab, lab)
        self.step += 1
        finite_loss = bool(torch.isfinite(loss))
        if not finite_loss and not self.dist.active:
            return self._nonfinite("loss")
        self.optimizer.zero_grad(set_to_none=True)
        # with several processes every one runs its backward pass (the gradient average needs them all)
        # and all take the same decision afterwards, in one exchange, at a point where they are in step
        (loss * scale if scale != 1.0 else loss).backward()
        clip = self.config.train.clip_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        finite_loss, finite_grad = distributed.all_true_each([finite_loss, bool(torch.isfinite(grad_norm))])
        if not (finite_loss and finite_grad):
            self.optimizer.zero_grad(set_to_none=True)
            return self._nonfinite("loss" if not finite_loss else "gradient")
        self.optimizer.step()
        return loss.item()

    def _nonfinite(self, what: str) -> None:
        if self.config.train.on_nonfinite == "skip":
            self.skipped += 1
            return None
        last = f"{self.out / runs.CHECKPOINT} (epoch {self.epoch})" if self.epoch else "none (it failed in the first epoch)"
        raise TrainingError(
            f"non-finite {what} at epoch {self.epoch + 1}, step {self.step}; last good checkpoint: {last}; "
            f"lower train.lr, set train.clip_norm, or set train.on_nonfinite=skip"
        )

    # ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train for the remaining epochs, then write the summary and figures; returns the summary.
        Parameters stay module-local meanwhile (:func:`pyrossl.infer.params.module_local`)."""
        try:
            with module_local():
                return self._fit()
        finally:
            self.release()

    def _fit(self) -> dict:
        self.setup()
        c = self.config
        select = "val_" + self.model.selection_metric
        completed = False
        try:
            with tqdm(range(self.epoch + 1, c.train.epochs + 1), desc=f"{c.model}/{self.model.guide_name}",
                      disable=not (c.train.progress and self.writer), initial=self.epoch, total=c.train.epochs, unit="epoch") as bar:
                with self.stop.catching(enabled=not self.dist.active):
                    self._epochs(bar, select)
            summary = self.finish()
            completed = True
            return summary
        except WriteError as exc:
            raise self._write_failed(exc) from None
        except RuntimeError as exc:
            if not (self.dist.active and distributed.is_collective_failure(exc)):
                raise
            raise self._peer_lost(exc) from None
        finally:
            self.loss_module = self.model  # no DDP wrapper once the process group is gone
            distributed.teardown(completed)  # see distributed.end_process for how a job's process ends

    def _epochs(self, bar, select: str) -> None:
        c = self.config
        for epoch in bar:
            start = time.perf_counter()
            self.model.train()
            logs = dict(self.model.start_epoch(epoch))  # a function of the epoch: called again on a mid-epoch resume
            partial, self.partial = self.partial, None
            if partial is not None:  # resuming inside this epoch: redraw its batch order, skip what was done
                self.generator.set_state(partial["data_rng"])
            data_rng = self.generator.get_state()
            batches = self.schedule.epoch(self.generator)
            first = int(partial["batch"]) if partial else 0
            if partial and not first < len(batches):
                raise CheckpointError(f"{self.out / runs.CHECKPOINT}: its partial epoch stopped after batch {first}, but the epoch "
                                      f"has {len(batches)}: the file is damaged or not this run's")
            losses = [float(v) for v in partial["losses"]] if partial else []
            earlier = float(partial["train_seconds"]) if partial else 0.0
            for i in range(first, len(batches)):
                loss = self._step(*batches[i])
                if loss is not None:
                    losses.append(loss)
                if self.stop and i + 1 < len(batches):
                    spent = time.perf_counter() - start
                    self.seconds += spent
                    self._checkpoint({"epoch": epoch, "batch": i + 1, "losses": losses, "data_rng": data_rng,
                                      "train_seconds": earlier + spent})
                    raise self.stop.error(f"at epoch {epoch}, step {i + 1} of {len(batches)}", self.out / runs.CHECKPOINT, self.out)
            self.epoch = epoch
            evaluate = epoch % c.train.eval_every == 0 or epoch == c.train.epochs
            logs.update(self._end_epoch(epoch, evaluate))
            if self.dist.active:  # the epoch's loss over every process's share
                total, count = distributed.sum_over_processes([sum(losses), len(losses)])
                losses = [total / count] if count else []
            train_seconds = earlier + time.perf_counter() - start
            metrics = self.scorer.parts(stream=epoch) if evaluate else {}
            if self.writer:  # an entry's files of the epoch (Serket's round tables), whether evaluated or not
                runs.write_tables(self.out, self.model.epoch_outputs(epoch, lambda index: self.data.y[index.to(self.device)]))
            self.seconds += time.perf_counter() - start
            record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else math.nan,
                      "train_seconds": train_seconds, **logs, **metrics}
            if self.skipped:
                record["skipped_steps"] = self.skipped
            score = metrics.get(select, -math.inf if self.split.validation.numel() else 0.0)
            if math.isnan(score):
                score = -math.inf
            if evaluate and (score > self.best_score or not self.split.validation.numel()):
                self.best_epoch, self.best_score = epoch, score
                if self.writer:
                    runs.atomic_save({"model": self.model.state_dict(), "epoch": epoch}, self.out / runs.BEST)
            if self.writer and self.records_kept is not None:
                runs.write_metrics(self.out, [*self.records_kept, record])
                self.records_kept = None
            elif self.writer:
                runs.append_metrics(self.out, record)
            if evaluate or epoch % c.train.checkpoint_every == 0 or self.stop:
                start = time.perf_counter()
                self._checkpoint()
                self.seconds += time.perf_counter() - start  # counted from the next checkpoint and in the summary
            if self.stop and epoch < c.train.epochs:
                raise self.stop.error(f"after epoch {epoch}", self.out / runs.CHECKPOINT, self.out)
            bar.set_postfix(loss=f"{record['loss']:.4g}", **({select: f"{score:.4g}"} if select in metrics else {}))

    def _end_epoch(self, epoch: int, evaluate: bool) -> dict:
        """The entry's non-gradient stage: with several processes it runs once, on rank 0, on every
        training image, and its result (the entry's whole state) and logs reach every process."""
        logs = self.model.end_epoch(epoch, self.data.training_tensors, evaluating=evaluate) if self.writer else None
        distributed.broadcast_state(self.model)  # no-ops with one process
        return distributed.broadcast_object(logs)

    def finish(self) -> dict:
        """Evaluate the best and the last epoch on the test set (every process takes its share); write
        summary.json and the figures (rank 0). Every process returns the summary."""
        if self.writer and self.records_kept is not None:  # a resume with no epoch left to train
            runs.write_metrics(self.out, self.records_kept)
            self.records_kept = None
        last_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        result = {"last": self.scorer.final(stream=self.epoch + 1)}
        if distributed.broadcast_object((self.out / runs.BEST).exists() if self.writer else None):
            if self.writer:
                runs.load_parameters(self.model, self.out / runs.BEST, map_location=self.device)
            distributed.broadcast_state(self.model)
            result["best"] = self.scorer.final(stream=self.epoch + 2)
        else:  # no epoch had a finite validation score
            result["best"] = result["last"]
        summary = self._write_summary(result) if self.writer else None
        self.model.load_state_dict(last_state)
        return distributed.broadcast_object(summary)

    def _write_summary(self, result: dict) -> dict:
        c = self.config
        records = runs.read_metrics(self.out)
        summary = {
            "model": c.model, "guide": c.guide, "z_guide": c.z_guide, "dataset": c.data.name, "seed": c.seed,
            "epochs": self.epoch, "best_epoch": self.best_epoch, "selection_metric": "val_" + self.model.selection_metric,
            "seconds": round(self.seconds, 3), "steps": self.step, "device": str(self.device),
            "processes": self.dist.world_size,
            "split": self.split.sizes(),
            **result["best"],
            "best": result["best"],
            "last": result["last"],
        }
        if self.skipped:
            summary["skipped_steps"] = self.skipped
        runs.atomic_write_text(self.out / runs.SUMMARY, json.dumps(summary, indent=2) + "\n")
        self.figures(records)
        return summary

    def figures(self, records: list[dict]) -> list[Path]:
        """Learning curves, the latent space, the model's own figures and ``figures/index.html``."""
        from pyrossl import report

        part = report.figure_part(self.split, self.model.evaluate_on_train)
        x, y = self.data.training_set() if part == "train" else self.data.part(part)
        outputs = type(self.model).read_outputs(runs.RunFiles(self.out), self.model.options)
        paths = report.draw_figures(self.model, self.dataset, records, x, y, self.out / runs.FIGURES, seed=self.config.seed,
                                    outputs=outputs)
        report.write_index(self.out, paths)
        return paths


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train(config: Config, out: str | Path, resume: bool = False) -> dict:
    """Train ``config`` into the run directory ``out``; returns the summary (also in ``summary.json``)."""
    return Trainer(config, out, resume=resume).fit()


def train_to_completion(config: Config, out: str | Path) -> dict:
    """The summary of ``out`` trained to ``config.train.epochs``: read when complete, else resumed or started.

    What benchmarks and ablations use, so that re-running them finishes only what is missing.
    """
    out = Path(out)
    summary = runs.read_summary(out)
    if summary.get("epochs") == config.train.epochs:
        return summary
    return train(config, out, resume=(out / runs.CHECKPOINT).exists())
