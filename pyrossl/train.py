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

The pieces: the batches of an epoch are :class:`~pyrossl.data.training.BatchSchedule`'s, the run
folder's state (checkpoints, ``best.pt``, the metrics records, what a resume checks)
:class:`~pyrossl.checkpoint.RunCheckpoints`', the metrics :class:`~pyrossl.scoring.Scorer`'s, the stop on
a signal :class:`~pyrossl.interrupt.StopRequest`'s, the figures :func:`pyrossl.report.draw_run`'s; the
settings are checked where they are declared (:mod:`pyrossl.config`). The :class:`Trainer` is the loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from pyrossl import distributed, precision, runs
from pyrossl.checkpoint import Progress, RunCheckpoints, config_differences
from pyrossl.config import LR_SCHEDULES, OPTIMIZERS, Config
from pyrossl.data.training import BatchSchedule, TrainingData
from pyrossl.distributed import resolve_device
from pyrossl.errors import (
    CheckpointError,
    ConfigError,
    TrainingError,
    WriteError,
)
from pyrossl.infer.anneal import LatentScaleMessenger, warmup_weight
from pyrossl.infer.params import module_local
from pyrossl.interrupt import StopRequest
from pyrossl.registry import build_model, resolve
from pyrossl.scoring import Scorer
from pyrossl.trackers import Trackers

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
        raise ConfigError(
            f"{name} = {k} needs about {need / 2**30:.0f} GiB for the IWAE bound ({images} images x {k} "
            f"samples x {pixels} pixels), more than the {have / 2**30:.0f} GiB of this {device.type}: lower it"
        )


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer):
    """``train.lr_schedule`` as a ``torch.optim.lr_scheduler`` object stepped once per epoch (``plateau``: per
    evaluated epoch, with the selection metric, which is better when higher); None for ``constant``."""
    t = config.train
    name = LR_SCHEDULES[t.lr_schedule]
    if name is None:
        return None
    cls = getattr(torch.optim.lr_scheduler, name)
    if t.lr_schedule == "cosine":  # lr_e = lr_min + (lr - lr_min) (1 + cos(pi e / epochs)) / 2
        return cls(optimizer, T_max=t.epochs, eta_min=t.lr_min)
    if t.lr_schedule == "step":  # lr_e = lr * lr_factor ** floor(e / lr_step_epochs)
        return cls(optimizer, step_size=t.lr_step_epochs, gamma=t.lr_factor)
    # torch's patience counts the bad epochs tolerated: the decay comes at the lr_step_epochs-th
    return cls(optimizer, mode="max", factor=t.lr_factor, patience=t.lr_step_epochs - 1, min_lr=t.lr_min)


def make_optimizer(config: Config, params) -> torch.optim.Optimizer:
    t = config.train
    params = list(params)
    # the fused kernels update every tensor in one pass: on CPU, Adam's step on M2's 1.3 M parameters
    # drops from about 5 ms to 0.5 ms (the per-tensor loop is PyTorch's CPU default); same update rule
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return getattr(torch.optim, OPTIMIZERS[t.optimizer])(
        params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None
    )


class Trainer:
    """Trains one config into one run directory (``resume=True`` continues from its checkpoint).

    The run folder's state (checkpoints, best.pt, metrics records, what a resume checks) is
    :class:`~pyrossl.checkpoint.RunCheckpoints`'; the batches are :class:`~pyrossl.data.training.BatchSchedule`'s;
    the metrics :class:`~pyrossl.scoring.Scorer`'s. What is left here is the loop: steps, epochs, stops.
    """

    def __init__(self, config: Config, out: str | Path, resume: bool = False, data=None):
        """``data``: a ``(Dataset, Split)`` to train on in place of the dataset the config names (what the
        scikit-learn estimators hand over, with ``data.name = "arrays"``)."""
        self.config = resolve(config)
        self.given_data = data
        self.out = Path(out)
        self.resume = resume
        self.lock = None
        if resume and not runs.is_run(self.out):
            raise CheckpointError(f"cannot resume: {self.out} is not a run directory (no {runs.CONFIG})")
        writer = distributed.environment().rank == 0
        self.checkpoints = RunCheckpoints(self.out, self.config, writer)
        if writer:
            runs.prepare_output(self.out)  # before any data is loaded: an --out that cannot be written fails now
            # the run's one writer from here to the end of fit(); what is checked below is checked under the lock
            self.lock = runs.RunLock(self.out, "pyrossl train" + (" --resume" if resume else "")).acquire()
        try:
            if resume:
                self.checkpoints.check_resumable()
            elif self.checkpoints.path.exists():
                raise CheckpointError(
                    f"{self.out} already holds a run: resume it with --resume {self.out}, or choose another --out"
                )
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give up the run directory's lock (fit() does, however it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def setup(self) -> None:
        c, t = self.config, self.config.train
        device = resolve_device(c.device)
        self.dist = distributed.setup(device)
        self.device = distributed.device_for(device)
        self.precision = precision.resolve(t.precision, self.device)
        self.writer = distributed.is_writer()
        if c.threads:
            torch.set_num_threads(c.threads)
        elif self.dist.active and self.device.type == "cpu":  # share the cores between this machine's processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        seed_everything(c.seed)
        if self.given_data is not None:
            self.dataset, self.split = self.given_data
        else:
            self.dataset = runs.load_dataset_for(c)
            self.split = runs.split_for(c, self.dataset)
        self.data = TrainingData.on_device(self.dataset, self.split, c.data.binarize, c.seed, self.device)
        self.model = build_model(c, self.dataset.meta()).to(self.device)
        self._check_split()
        self.schedule = BatchSchedule(
            self.split,
            t.batch_size,
            t.labelled_batch_size,
            t.labelled_every,
            self.model.uses_labels,
            self.model.uses_unlabelled,
            c.model,
        )
        self.scorer = Scorer(self.model, self.data, self.dist, self.device, c.seed, t.eval_batch_size, t.iwae_samples)
        self.model.prepare(self.data.training_tensors)
        self.optimizer = make_optimizer(c, self.model.parameters())
        self.scheduler = make_scheduler(c, self.optimizer)
        self.kl_weight = 1.0  # the latent terms' weight in the step being taken (train.kl_warmup_epochs)
        self.trackers = Trackers(t.loggers if self.writer else [])
        self.stopped_early = False
        self.generator = torch.Generator().manual_seed(c.seed)
        self.progress = Progress()
        self.partial = None  # where a mid-epoch checkpoint stopped: {"epoch", "batch", "losses", "data_rng", ...}
        self.stop = StopRequest()  # a signal asking training to stop after the current step
        ranks = None  # every process's random state at the checkpoint resumed from
        resumed = self.checkpoints.start(self.resume)
        if resumed:
            self.progress, self.partial, ranks = self.checkpoints.restore(
                self.model, self.optimizer, self.generator, self.scheduler
            )
            if t.lr_schedule == "cosine":  # an extended run (more epochs) anneals from here to its new end
                self.scheduler.T_max = t.epochs
        else:
            self.model.pretrain(self.data.training_tensors, c.seed, runs.read_sources(self.model.source_runs()))
        self.trackers.start(self.out, c, self.progress.step if resumed else None)
        self.loss_module = self.model
        if self.dist.active:
            # gradients averaged over the processes; the entry itself stays what checkpoints hold
            steps = self.schedule.first_steps(self.generator)  # one of each kind: with and without labels
            trials = [lambda step=step: self._loss(self.model, *step) for step in steps]
            self.loss_module = distributed.wrap(
                self.model, self.device, distributed.has_unused_parameters(self.model, trials, self.device)
            )
            # each process draws its own sampling noise; the data generator (the batch order) is shared.
            # A resume on as many processes as wrote the checkpoint takes up each one's streams where they
            # were; on another number of processes the streams start anew (the run goes on, not bit for bit)
            if not self.checkpoints.restore_process_rng(ranks, self.dist, self.generator):
                words = [c.seed, self.progress.epoch, self.dist.rank, self.dist.world_size]
                pyro.set_rng_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))
            distributed.barrier()  # rank 0 has written the run directory

    def _check_split(self) -> None:
        """Each part of the split holds at least what its consumers need, said before any step; an IWAE k
        (``train.iwae_samples``) this machine cannot hold is said now, not after training."""
        if self.split.unlabelled.numel() + self.split.labelled.numel() == 0:
            raise ConfigError("the split leaves no training examples")
        for part, key in (("validation", "data.validation"), ("test", "data.test")):
            if (
                getattr(self.split, part).numel() == 1
            ):  # 0 turns it off; the latent figure projects a part onto 2 components
                raise ConfigError(f"{key} leaves 1 {part} example: at least 2 are needed (or 0 for none)")
        self.model.check_split(self.split, self.dataset)
        t = self.config.train
        if not self.split.validation.numel() and (t.patience is not None or t.lr_schedule == "plateau"):
            raise ConfigError(
                f"{'train.patience' if t.patience is not None else 'train.lr_schedule = plateau'} watches the "
                "selection metric on the validation part, and the split has none: set data.validation"
            )
        check_iwae_memory(
            self.config.train.iwae_samples,
            self.split.test.numel(),
            self.dataset.num_features,
            self.device,
            "train.iwae_samples",
        )

    def _checkpoint(self, partial: dict | None = None) -> None:
        self.checkpoints.save(
            self.model, self.optimizer, self.generator, self.progress, self.dist, partial, self.scheduler
        )

    # ------------------------------------------------------------------------------------
    def _loss(self, module: torch.nn.Module, unlab: torch.Tensor | None, lab: torch.Tensor | None) -> torch.Tensor:
        """The loss of ``module`` (the entry, or its DDP wrapper) on one step's index batches; an entry
        that ``wants_index`` also gets the unlabelled images' dataset indices."""
        x, _ = self.data.inputs(unlab)
        x_lab, y_lab = self.data.inputs(lab)
        if self.model.wants_index and unlab is not None:
            return module(x, x_lab, y_lab, index=unlab.to(self.device))
        return module(x, x_lab, y_lab)

    def _step(self, unlab, lab) -> float | None:
        unlab, lab, scale = distributed.shard_step(unlab, lab)
        # the KL warm-up weights the latent terms of whatever model and guide run inside (pyrossl.infer.anneal)
        with LatentScaleMessenger(self.kl_weight) if self.kl_weight < 1 else contextlib.nullcontext():
            loss = self._loss(self.loss_module, unlab, lab)
        self.progress.step += 1
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
            self.progress.skipped += 1
            return None
        last = (
            f"{self.checkpoints.path} (epoch {self.progress.epoch})"
            if self.progress.epoch
            else "none (it failed in the first epoch)"
        )
        raise TrainingError(
            f"non-finite {what} at epoch {self.progress.epoch + 1}, step {self.progress.step}; last good checkpoint: "
            f"{last}; "
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
            if hasattr(self, "trackers"):  # set up: close what they hold open (event files)
                self.trackers.close()
            self.release()

    def _fit(self) -> dict:
        self.setup()
        # every step, evaluation and figure: the networks' layers in the run's precision (pyrossl.precision)
        with precision.networks_in(self.model, self.precision, self.device):
            return self._train()

    def _train(self) -> dict:
        c = self.config
        select = "val_" + self.model.selection_metric
        completed = False
        try:
            with tqdm(
                range(self.progress.epoch + 1, c.train.epochs + 1),
                desc=f"{c.model}/{self.model.guide_name}",
                disable=not (c.train.progress and self.writer),
                initial=self.progress.epoch,
                total=c.train.epochs,
                unit="epoch",
            ) as bar:
                with self.stop.catching(enabled=not self.dist.active):
                    self._epochs(bar, select)
            summary = self.finish()
            completed = True
            return summary
        except WriteError as exc:
            raise self.checkpoints.write_failed(exc) from None
        except RuntimeError as exc:
            if not (self.dist.active and distributed.is_collective_failure(exc)):
                raise
            raise self.checkpoints.peer_lost(exc, self.dist) from None
        finally:
            self.loss_module = self.model  # no DDP wrapper once the process group is gone
            distributed.teardown(completed)  # see distributed.end_process for how a job's process ends

    def _patience_spent(self) -> bool:
        """``train.patience`` evaluated epochs in a row without a better selection metric (on a resume too,
        where a larger patience lets a run that stopped early go on)."""
        patience = self.config.train.patience
        self.stopped_early = patience is not None and self.progress.stale >= patience
        return self.stopped_early

    def _epochs(self, bar, select: str) -> None:
        c = self.config
        if self._patience_spent():
            return
        for epoch in bar:
            start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]  # this epoch's, before the schedule's step at its end
            self.model.train()
            logs = dict(self.model.start_epoch(epoch))  # a function of the epoch: called again on a mid-epoch resume
            partial, self.partial = self.partial, None
            if partial is not None:  # resuming inside this epoch: redraw its batch order, skip what was done
                self.generator.set_state(partial["data_rng"])
            data_rng = self.generator.get_state()
            batches = self.schedule.epoch(self.generator)
            first = int(partial["batch"]) if partial else 0
            if partial and not first < len(batches):
                raise CheckpointError(
                    f"{self.checkpoints.path}: its partial epoch stopped after batch {first}, but the epoch "
                    f"has {len(batches)}: the file is damaged or not this run's"
                )
            losses = [float(v) for v in partial["losses"]] if partial else []
            earlier = float(partial["train_seconds"]) if partial else 0.0
            for i in range(first, len(batches)):
                self.kl_weight = warmup_weight(epoch - 1 + (i + 1) / len(batches), c.train.kl_warmup_epochs)
                loss = self._step(*batches[i])
                if loss is not None:
                    losses.append(loss)
                    self.trackers.step(self.progress.step, loss)
                if self.stop and i + 1 < len(batches):
                    spent = time.perf_counter() - start
                    self.progress.seconds += spent
                    self._checkpoint(
                        {
                            "epoch": epoch,
                            "batch": i + 1,
                            "losses": losses,
                            "data_rng": data_rng,
                            "train_seconds": earlier + spent,
                        }
                    )
                    raise self.stop.error(
                        f"at epoch {epoch}, step {i + 1} of {len(batches)}", self.checkpoints.path, self.out
                    )
            self.progress.epoch = epoch
            evaluate = epoch % c.train.eval_every == 0 or epoch == c.train.epochs
            logs.update(self._end_epoch(epoch, evaluate))
            if self.dist.active:  # the epoch's loss over every process's share
                total, count = distributed.sum_over_processes([sum(losses), len(losses)])
                losses = [total / count] if count else []
            train_seconds = earlier + time.perf_counter() - start
            scored = time.perf_counter()
            metrics = self._score(epoch) if evaluate else {}
            eval_seconds = time.perf_counter() - scored
            if self.writer:  # an entry's files of the epoch (Serket's round tables), whether evaluated or not
                runs.write_tables(
                    self.out, self.model.epoch_outputs(epoch, lambda index: self.data.y[index.to(self.device)])
                )
            self.progress.seconds += time.perf_counter() - start
            record = {
                "epoch": epoch,
                "loss": float(np.mean(losses)) if losses else math.nan,
                "train_seconds": train_seconds,
                **({"eval_seconds": eval_seconds} if evaluate else {}),
                **logs,
                **metrics,
            }
            if self.progress.skipped:
                record["skipped_steps"] = self.progress.skipped
            if self.scheduler is not None:
                record["lr"] = lr
            if c.train.kl_warmup_epochs:
                record["kl_weight"] = self.kl_weight  # at the epoch's last step
            if self.checkpoints.extended_from is not None:  # the first epoch trained since the extension says so
                record["extended_from_epochs"] = self.checkpoints.extended_from
                self.checkpoints.extended_from = None
            score = metrics.get(select, -math.inf if self.split.validation.numel() else 0.0)
            if math.isnan(score):
                score = -math.inf
            if evaluate and (score > self.progress.best_score or not self.split.validation.numel()):
                self.progress.best_epoch, self.progress.best_score, self.progress.stale = epoch, score, 0
                self.checkpoints.save_best(self.model, epoch)
            elif evaluate:
                self.progress.stale += 1
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if evaluate:
                    self.scheduler.step(score)
            elif self.scheduler is not None:
                self.scheduler.step()
            self.checkpoints.record(record)
            self.trackers.epoch(self.progress.step, record)
            if evaluate or epoch % c.train.checkpoint_every == 0 or self.stop:
                start = time.perf_counter()
                self._checkpoint()
                self.progress.seconds += (
                    time.perf_counter() - start
                )  # counted from the next checkpoint and in the summary
            if self.stop and epoch < c.train.epochs:
                raise self.stop.error(f"after epoch {epoch}", self.checkpoints.path, self.out)
            if self._patience_spent():
                break
            bar.set_postfix(loss=f"{record['loss']:.4g}", **({select: f"{score:.4g}"} if select in metrics else {}))

    def _score(self, epoch: int) -> dict:
        """An evaluated epoch's metrics: the validation part (what selects the best epoch), the test part
        only with ``train.eval_test``, the code's diagnostics every ``train.diagnose_every`` epochs and
        after the last (the best and the last epoch are scored on everything by :meth:`finish`)."""
        t = self.config.train
        parts = ("validation", "test") if t.eval_test else ("validation",)
        code = epoch == t.epochs or bool(t.diagnose_every and epoch % t.diagnose_every == 0)
        return self.scorer.parts(parts, stream=epoch, code=code)

    def _end_epoch(self, epoch: int, evaluate: bool) -> dict:
        """The entry's non-gradient stage: with several processes it runs once, on rank 0, on every
        training image, and its result (the entry's whole state) and logs reach every process."""
        logs = self.model.end_epoch(epoch, self.data.training_tensors, evaluating=evaluate) if self.writer else None
        distributed.broadcast_state(self.model)  # no-ops with one process
        return distributed.broadcast_object(logs)

    def finish(self) -> dict:
        """Evaluate the best and the last epoch on the test set (every process takes its share); write
        summary.json and, unless ``train.figures`` is off, the figures (rank 0). Every process returns the summary."""
        self.checkpoints.record()  # a resume with no epoch left to train: the records up to its checkpoint
        last_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        result = {"last": self.scorer.final(stream=self.progress.epoch + 1)}
        if self.checkpoints.has_best():
            self.checkpoints.load_best(self.model, self.device)
            result["best"] = self.scorer.final(stream=self.progress.epoch + 2)
        else:  # no epoch had a finite validation score
            result["best"] = result["last"]
        summary = summary_of(self, result) if self.writer else None
        if self.writer:
            runs.atomic_write_text(self.out / runs.SUMMARY, json.dumps(summary, indent=2) + "\n")
        if self.writer and self.config.train.figures:
            from pyrossl import report  # matplotlib, imported when the figures are drawn

            _, figures = report.draw_run(
                self.out, self.model, self.dataset, self.split, self.data.tensors, self.config.seed
            )
        if self.writer:
            self.trackers.finish(summary, figures if self.config.train.figures else [])
        self.model.load_state_dict(last_state)
        return distributed.broadcast_object(summary)


def summary_of(trainer: Trainer, result: dict) -> dict:
    """``summary.json``: what ran (config, device, processes, split sizes), how long, and the metrics of
    the best epoch (at the top level too) and of the last."""
    c, p = trainer.config, trainer.progress
    summary = {"model": c.model, "guide": c.guide, "z_guide": c.z_guide, "dataset": c.data.name, "seed": c.seed}
    summary.update(epochs=p.epoch, best_epoch=p.best_epoch, selection_metric="val_" + trainer.model.selection_metric)
    summary.update(
        seconds=round(p.seconds, 3),
        steps=p.step,
        device=str(trainer.device),
        precision=trainer.precision,
        processes=trainer.dist.world_size,
    )
    summary.update(split=trainer.split.sizes(), **result["best"], best=result["best"], last=result["last"])
    if p.skipped:
        summary["skipped_steps"] = p.skipped
    if trainer.stopped_early:
        summary["stopped_early"] = {
            "epoch": p.epoch,
            "best_epoch": p.best_epoch,
            "patience": c.train.patience,
            "reason": f"no better {summary['selection_metric']} in {c.train.patience} evaluated epochs",
        }
    return summary


def train(config: Config, out: str | Path, resume: bool = False) -> dict:
    """Train ``config`` into the run directory ``out``; returns the summary (also in ``summary.json``)."""
    return Trainer(config, out, resume=resume).fit()


def finished(summary: dict, config: Config) -> bool:
    """Whether a run's summary is the end of ``config``'s training: all its epochs, or stopped early under
    the same ``train.patience`` (an empty summary: not finished)."""
    stopped = summary.get("stopped_early")
    return summary.get("epochs") == config.train.epochs or bool(
        stopped and stopped["patience"] == config.train.patience
    )


def train_to_completion(config: Config, out: str | Path) -> dict:
    """The summary of ``out`` trained to ``config.train.epochs``: read when complete, else resumed or started.

    What benchmarks and ablations use, so that re-running them finishes only what is missing.
    """
    out = Path(out)
    summary = runs.read_summary(out)
    if finished(summary, config):
        diff = config_differences(runs.read_config(out), resolve(config))
        if diff:  # a finished run is the answer only for its own config
            raise CheckpointError(f"{out} holds a finished run of another config (it differs in {', '.join(diff)})")
        return summary
    return train(config, out, resume=(out / runs.CHECKPOINT).exists())
