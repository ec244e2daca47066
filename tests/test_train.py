import errno
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common import DiskFull, tiny_config
from pyrossl import distributed, load_run, runs
from pyrossl.errors import CheckpointError, ConfigError, TrainingError, TrainingInterrupted
from pyrossl.registry import resolve
from pyrossl.train import Trainer, make_optimizer, train, train_to_completion


def _params(run_dir, name=runs.CHECKPOINT):
    return runs.load_checkpoint(run_dir / name)["model"]


def test_run_directory_is_complete(tmp_path):
    summary = train(tiny_config(**{"train.iwae_samples": 5, "train.figures": True}), tmp_path / "run")
    run = tmp_path / "run"
    for name in (runs.CONFIG, runs.METRICS, runs.SUMMARY, runs.CHECKPOINT, runs.BEST):
        assert (run / name).is_file(), name
    for figure in (
        "loss.png",
        "metrics.png",
        "kl_per_unit.png",
        "latent_pca.png",
        "reconstructions.png",
        "samples.png",
    ):
        assert (run / "figures" / figure).stat().st_size > 0, figure
    saved = json.loads((run / runs.SUMMARY).read_text())
    for key in (
        "model",
        "guide",
        "dataset",
        "seed",
        "epochs",
        "seconds",
        "best_epoch",
        "test_elbo",
        "test_log_likelihood",
    ):
        assert key in saved, key
    assert saved["guide"] == "amortised" and saved["z_guide"] == "diag-normal" and saved["epochs"] == 3
    z_dim = runs.read_config(run).options["z_dim"]
    assert len(saved["val_kl_per_unit"]) == z_dim and 0 <= saved["val_active_units"] <= z_dim
    assert summary["last"]["test_elbo"] == saved["last"]["test_elbo"]
    records = runs.read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and "val_elbo" in r and r["eval_seconds"] > 0 for r in records)
    assert not any("test_elbo" in r for r in records)  # the test part is scored at the end (train.eval_test)
    assert [r["epoch"] for r in records if "val_kl_per_unit" in r] == [3]  # train.diagnose_every = 5: the last
    # the IWAE bound with 5 samples is at least the ELBO (up to Monte Carlo noise)
    assert saved["test_log_likelihood"] > saved["test_elbo"] - 1.0
    # training improves the ELBO
    assert records[-1]["val_elbo"] > records[0]["val_elbo"]


def test_best_epoch_is_the_best_validation_score(tmp_path):
    summary = train(tiny_config(), tmp_path / "run")
    records = runs.read_metrics(tmp_path / "run")
    best = max(records, key=lambda r: r["val_elbo"])
    assert summary["best_epoch"] == best["epoch"]
    assert runs.load_checkpoint(tmp_path / "run" / runs.BEST)["epoch"] == best["epoch"]


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    # the code's diagnostics every epoch: by default the last epoch has them, and "part" ends at 2
    config = tiny_config(**{"train.epochs": 4, "data.binarize": True, "train.diagnose_every": 1})
    train(config, tmp_path / "full")
    # stop after two epochs, then resume to four
    train(tiny_config(**{"train.epochs": 2, "data.binarize": True, "train.diagnose_every": 1}), tmp_path / "part")
    (tmp_path / "part" / runs.CONFIG).write_text((tmp_path / "full" / runs.CONFIG).read_text())
    train(config, tmp_path / "part", resume=True)
    full, part = _params(tmp_path / "full"), _params(tmp_path / "part")
    assert full.keys() == part.keys()
    for key in full:
        assert torch.equal(full[key], part[key]), key
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
    assert strip(runs.read_metrics(tmp_path / "full")) == strip(runs.read_metrics(tmp_path / "part"))


def test_resume_truncates_metrics_written_after_the_checkpoint(tmp_path):
    train(tiny_config(), tmp_path / "run")
    runs.append_metrics(tmp_path / "run", {"epoch": 99, "loss": 0.0})
    train(tiny_config(), tmp_path / "run", resume=True)
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_finished_run_extended_by_a_resume_ends_as_the_longer_run(tmp_path):
    from pyrossl.cli import main

    train(tiny_config(**{"train.epochs": 2}), tmp_path / "short")
    config_before = (tmp_path / "short" / runs.CONFIG).read_text()
    for settings, refused in (
        ({"train.epochs": 1}, "with train.epochs = 1: the run has 2 epochs, and a resume may only add epochs"),
        ({"train.epochs": 4, "train.lr": 0.5}, "its config differs in train.lr"),  # the rest is still compared
    ):
        with pytest.raises(CheckpointError, match=re.escape(refused)):
            train(tiny_config(**settings), tmp_path / "short", resume=True)
        assert (tmp_path / "short" / runs.CONFIG).read_text() == config_before  # refused: nothing changed
    # from the command line, as a user extends a run
    assert main(["train", "--resume", str(tmp_path / "short"), "--set", "train.epochs=4", "--quiet"]) == 0
    summary = train(tiny_config(**{"train.epochs": 4}), tmp_path / "long")
    extended = runs.read_summary(tmp_path / "short")
    assert extended["epochs"] == summary["epochs"] == 4 and runs.read_config(tmp_path / "short").train.epochs == 4
    records = runs.read_metrics(tmp_path / "short")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r.get("extended_from_epochs") for r in records] == [None, None, 2, None]  # where the run grew
    for key in ("loss", "val_elbo"):  # every epoch evaluated (train.eval_every = 1): the same numbers
        assert [r[key] for r in records] == [r[key] for r in runs.read_metrics(tmp_path / "long")]
    short = runs.load_checkpoint(tmp_path / "short" / runs.CHECKPOINT, keys=("model",))["model"]
    long = runs.load_checkpoint(tmp_path / "long" / runs.CHECKPOINT, keys=("model",))["model"]
    assert short.keys() == long.keys() and all(torch.equal(short[k], long[k]) for k in short)
    assert main(["train", "--resume", str(tmp_path / "short"), "--set", "train.epochs=3", "--quiet"]) == 2


def test_train_to_completion_reads_a_finished_run_only_for_its_own_config(tmp_path):
    summary = train(tiny_config(**{"train.epochs": 2}), tmp_path / "run")
    assert train_to_completion(tiny_config(**{"train.epochs": 2, "train.progress": True}), tmp_path / "run") == summary
    with pytest.raises(CheckpointError, match="holds a finished run of another config .it differs in train.lr."):
        train_to_completion(tiny_config(**{"train.epochs": 2, "train.lr": 0.5}), tmp_path / "run")


def test_how_much_is_evaluated_may_change_on_resume(tmp_path):
    train(tiny_config(**{"train.epochs": 2}), tmp_path / "run")
    changed = {"train.epochs": 2, "train.eval_test": True, "train.diagnose_every": 1, "train.eval_every": 2}
    assert train(tiny_config(**changed), tmp_path / "run", resume=True)["epochs"] == 2
    with pytest.raises(CheckpointError, match="differs in train.precision"):
        train(tiny_config(**{"train.epochs": 2, "train.precision": "bf16"}), tmp_path / "run", resume=True)


def test_a_run_without_figures_draws_them_on_a_resume_that_asks_or_with_report(tmp_path):
    from pyrossl.report import write_report

    run = tmp_path / "run"
    summary = train(tiny_config(**{"train.epochs": 2}), run)  # tiny_config: train.figures = false
    assert not (run / runs.FIGURES).exists() and runs.read_summary(run) == summary
    assert load_run(run).model is not None  # a run without figures is whole
    train(tiny_config(**{"train.epochs": 2, "train.figures": True}), run, resume=True)
    drawn = {p.name for p in (run / runs.FIGURES).iterdir()}
    assert {"index.html", "loss.png", "latent_pca.png"} <= drawn
    shutil.rmtree(run / runs.FIGURES)
    index, figures = write_report(run)
    assert index.exists() and {p.name for p in figures} == drawn - {"index.html"}


def test_resume_refuses_a_different_config(tmp_path):
    train(tiny_config(), tmp_path / "run")
    with pytest.raises(CheckpointError, match="differs in train.lr"):
        Trainer(tiny_config(**{"train.lr": 0.5}), tmp_path / "run", resume=True)


def test_resume_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="not a run directory"):
        Trainer(tiny_config(), tmp_path, resume=True)


def test_existing_run_is_not_overwritten(tmp_path):
    train(tiny_config(**{"train.epochs": 1}), tmp_path / "run")
    with pytest.raises(CheckpointError, match="already holds a run"):
        Trainer(tiny_config(), tmp_path / "run")


def _nan_at_call(monkeypatch, bad_call):
    from pyrossl.models.vae import VAE

    calls = {"n": 0}
    forward = VAE.forward

    def nan_once(self, x, x_lab=None, y_lab=None):
        calls["n"] += 1
        loss = forward(self, x, x_lab, y_lab)
        return loss * float("nan") if calls["n"] == bad_call else loss

    monkeypatch.setattr(VAE, "forward", nan_once)


def test_non_finite_loss_stops_with_the_last_checkpoint(tmp_path, monkeypatch):
    _nan_at_call(monkeypatch, 1)
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 1, step 1; last good checkpoint: none"):
        train(tiny_config(**{"train.epochs": 2}), tmp_path / "run")
    _nan_at_call(monkeypatch, 15)  # in the second epoch (digits: 11 steps per epoch)
    with pytest.raises(TrainingError, match=r"epoch 2, step 15; last good checkpoint: .*checkpoint.pt \(epoch 1\)"):
        train(tiny_config(**{"train.epochs": 2}), tmp_path / "run2")
    assert runs.load_checkpoint(tmp_path / "run2" / runs.CHECKPOINT)["counters"]["epoch"] == 1


def test_non_finite_steps_can_be_skipped_and_counted(tmp_path, monkeypatch):
    _nan_at_call(monkeypatch, 2)
    summary = train(tiny_config(**{"train.on_nonfinite": "skip", "train.epochs": 1}), tmp_path / "run")
    assert summary["skipped_steps"] == 1
    assert runs.load_checkpoint(tmp_path / "run" / runs.CHECKPOINT)["counters"]["skipped"] == 1
    assert runs.read_metrics(tmp_path / "run")[0]["skipped_steps"] == 1


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.batch_size", 0, "batch_size must be at least 1"),
        ("train.epochs", 0, "epochs must be at least 1"),
        ("train.optimizer", "adagrad", "unknown optimizer"),
        ("device", "tpu", "unknown device"),
        ("train.labelled_every", 0, "labelled_every must be at least 1"),
        ("train.diagnose_every", -1, "diagnose_every must be 0 .after the last epoch only. or more"),
    ],
)
def test_bad_training_settings(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(**{key: value}), tmp_path / "run")


def test_cuda_requested_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(tiny_config(device="cuda"), tmp_path / "run")


def test_the_test_part_and_the_codes_diagnostics_are_scored_when_the_recipe_asks(tmp_path):
    settings = {"train.epochs": 4, "train.eval_test": True, "train.diagnose_every": 2}
    train(tiny_config(**settings), tmp_path / "a")
    records = runs.read_metrics(tmp_path / "a")
    assert all("test_elbo" in r and "val_elbo" in r for r in records)
    assert [r["epoch"] for r in records if "val_kl_per_unit" in r] == [2, 4]
    train(tiny_config(**{"train.epochs": 3, "train.diagnose_every": 0}), tmp_path / "b")
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "b") if "val_active_units" in r] == [3]
    # the summary's best and last epoch are scored on everything
    summary = runs.read_summary(tmp_path / "b")
    assert "test_elbo" in summary["last"] and "val_kl_per_unit" in summary["best"]


def test_eval_every_evaluates_every_n_epochs_and_the_last(tmp_path):
    summary = train(tiny_config(**{"train.epochs": 5, "train.eval_every": 2}), tmp_path / "run")
    records = runs.read_metrics(tmp_path / "run")
    assert [("val_elbo" in r) for r in records] == [False, True, False, True, True]
    assert summary["best_epoch"] in (2, 4, 5)


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    train(tiny_config(**{"train.epochs": 2}), tmp_path / "run")
    with open(tmp_path / "run" / runs.METRICS, "a") as f:
        f.write('{"epoch": 3, "loss": 1.2')  # the process died mid-write
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "run")] == [1, 2]
    train(tiny_config(**{"train.epochs": 2}), tmp_path / "run", resume=True)
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "run")] == [1, 2]


def test_binarised_runs_score_fixed_binary_held_out_images(tmp_path):
    from pyrossl.train import Trainer

    trainer = Trainer(tiny_config(**{"data.binarize": True}), tmp_path / "run")
    trainer.setup()
    x, _ = trainer.data.part("test")
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    again = Trainer(tiny_config(**{"data.binarize": True}), tmp_path / "run2")
    again.setup()
    assert torch.equal(again.data.part("test")[0], x)


def test_no_finite_validation_score_falls_back_to_the_last_epoch(tmp_path, monkeypatch):
    from pyrossl.models.vae import VAE

    evaluate = VAE.evaluate
    monkeypatch.setattr(
        VAE, "evaluate", lambda self, x, y, batch_size=1000: {**evaluate(self, x, y, batch_size), "elbo": float("nan")}
    )
    summary = train(tiny_config(**{"train.epochs": 2}), tmp_path / "run")
    assert summary["best"] == summary["last"]


def test_train_to_completion_reads_a_finished_run_and_finishes_an_unfinished_one(tmp_path):
    config = tiny_config(**{"train.epochs": 2})
    first = train_to_completion(config, tmp_path / "run")
    stamp = (tmp_path / "run" / runs.CHECKPOINT).stat().st_mtime_ns
    assert train_to_completion(config, tmp_path / "run") == first  # read, not retrained
    assert (tmp_path / "run" / runs.CHECKPOINT).stat().st_mtime_ns == stamp
    (tmp_path / "run" / runs.SUMMARY).unlink()  # as if killed before the summary was written
    again = train_to_completion(config, tmp_path / "run")
    assert again["epochs"] == 2 and again["best"]["test_elbo"] == first["best"]["test_elbo"]


def _same_run(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
    assert strip(runs.read_metrics(a)) == strip(runs.read_metrics(b))


def _stop_at_step(monkeypatch, stop_step):
    """Request a stop (what Ctrl-C does) during global step ``stop_step``."""
    step = Trainer._step

    def stepping(self, unlab, lab):
        loss = step(self, unlab, lab)
        if self.progress.step == stop_step:
            self.stop.signum = signal.SIGINT
        return loss

    monkeypatch.setattr(Trainer, "_step", stepping)


M2_SMALL = {
    "model": "m2",
    "guide": "gumbel",
    "data.labels_per_class": 5,
    "train.batch_size": 64,
    "train.epochs": 3,
    "data.binarize": True,
    "options": {"z_dim": 4, "hidden": [32]},
}


M2_NEW_GUIDES = {**M2_SMALL, "guide": "dirichlet", "z_guide": "lowrank-normal", "train.particles": 2}
SDGM_FLOW = {
    **M2_SMALL,
    "model": "sdgm",
    "guide": "enum",
    "z_guide": "flow",
    "options": {"z_dim": 4, "a_dim": 3, "hidden": [32], "flow_hidden": [16]},
}
VAE_FLOW = {
    "data.binarize": True,
    "z_guide": "flow",
    "train.objective": "iwae",
    "train.particles": 3,
    "options": {"z_dim": 4, "hidden": [32], "flow_hidden": [16]},
}


@pytest.mark.parametrize(
    "overrides, stop_step",
    [({"data.binarize": True}, 15), (M2_SMALL, 30), (VAE_FLOW, 15), (M2_NEW_GUIDES, 30), (SDGM_FLOW, 30)],
    ids=["vae", "m2-gumbel", "vae-flow-iwae", "m2-dirichlet-lowrank", "sdgm-flow"],
)
def test_a_stop_inside_an_epoch_checkpoints_there_and_resumes_to_the_same_numbers(
    tmp_path, monkeypatch, overrides, stop_step
):
    config = tiny_config(**overrides)
    train(config, tmp_path / "full")
    with monkeypatch.context() as m:
        _stop_at_step(m, stop_step)
        with pytest.raises(
            TrainingInterrupted,
            match=(
                r"interrupted at epoch 2, step \d+ of \d+; .*resume with: pyrossl train --resume "
                rf"{tmp_path / 'part'}"
            ),
        ):
            train(config, tmp_path / "part")
    state = runs.load_checkpoint(tmp_path / "part" / runs.CHECKPOINT)
    assert state["counters"]["epoch"] == 1 and state["counters"]["step"] == stop_step
    assert state["partial"]["epoch"] == 2 and state["partial"]["batch"] > 0
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "part")] == [1]
    train(config, tmp_path / "part", resume=True)
    _same_run(tmp_path / "full", tmp_path / "part")


def test_a_stop_in_the_last_step_of_an_epoch_checkpoints_the_whole_epoch(tmp_path, monkeypatch):
    config = tiny_config(**{"train.checkpoint_every": 10, "train.eval_every": 10})  # 10 steps per epoch
    train(config, tmp_path / "full")
    with monkeypatch.context() as m:
        _stop_at_step(m, 10)
        with pytest.raises(TrainingInterrupted, match="interrupted after epoch 1; "):
            train(config, tmp_path / "part")
    state = runs.load_checkpoint(tmp_path / "part" / runs.CHECKPOINT)
    assert state["counters"]["epoch"] == 1 and "partial" not in state
    train(config, tmp_path / "part", resume=True)
    _same_run(tmp_path / "full", tmp_path / "part")


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def save_then_fill_the_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 4:  # best.pt and checkpoint.pt of epoch 1 are written, then the disk is full
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(runs.torch, "save", save_then_fill_the_disk)
    with pytest.raises(
        CheckpointError, match=r"cannot write .*checkpoint.pt \(the disk is full\); the previous checkpoint is intact"
    ):
        train(tiny_config(**{"train.epochs": 3}), tmp_path / "run")
    monkeypatch.undo()
    assert runs.load_checkpoint(tmp_path / "run" / runs.CHECKPOINT)["counters"]["epoch"] == 1
    assert not list((tmp_path / "run").glob(".*.tmp"))
    train(tiny_config(**{"train.epochs": 3}), tmp_path / "run", resume=True)
    train(tiny_config(**{"train.epochs": 3}), tmp_path / "full")
    _same_run(tmp_path / "full", tmp_path / "run")


def test_a_full_disk_at_each_write_in_turn_is_one_line_and_the_resumed_run_ends_the_same(tmp_path, monkeypatch):
    """Fault injection at the write layer: the disk fills at the n-th file the run writes (a checkpoint,
    best.pt, the metrics, the summary, a figure...). Each time: one line naming the file, the run
    loads, and after space is freed a resume ends exactly as the uninterrupted run. A bounded profile;
    PYROSSL_FAULTS=long tries every write."""
    from pyrossl import files

    config = tiny_config(**{"train.epochs": 3, "train.eval_every": 2})
    real, written = files._fdopen, []

    def counting(fd, mode):
        written.append(fd)
        return real(fd, mode)

    monkeypatch.setattr(files, "_fdopen", counting)
    train(config, tmp_path / "whole")
    total = len(written)
    every = (
        range(1, total + 1)
        if os.environ.get("PYROSSL_FAULTS") == "long"
        else sorted({1, 2, 3, total // 3, total // 2, total - 1, total})
    )

    for n in every:
        run, count = tmp_path / f"full-at-{n}", [0]

        def full_at_n(fd, mode, n=n, count=count):
            count[0] += 1
            return (
                DiskFull(real(fd, mode), room=-1) if count[0] == n else real(fd, mode)
            )  # (-1: even an empty write fails)

        monkeypatch.setattr(files, "_fdopen", full_at_n)
        with pytest.raises(CheckpointError) as info:
            train(config, run)
        message = str(info.value)
        assert "\n" not in message and "(the disk is full)" in message, message
        monkeypatch.setattr(files, "_fdopen", real)
        if (run / runs.CHECKPOINT).exists():
            runs.load_checkpoint(run / runs.CHECKPOINT)
            assert "resume with pyrossl train --resume" in message
        train(config, run, resume=runs.is_run(run))  # (a run whose config.toml was never written starts anew)
        _same_run(tmp_path / "whole", run)
        assert not list(run.glob(".*.tmp"))
    assert len(every) >= 5 and total >= 10


def test_resume_removes_temporaries_a_kill_left_behind(tmp_path):
    train(tiny_config(**{"train.epochs": 1}), tmp_path / "run")
    stale = tmp_path / "run" / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"cut short")
    runs.write_config(tmp_path / "run", resolve(tiny_config(**{"train.epochs": 2})))  # now a 2-epoch run
    train(tiny_config(**{"train.epochs": 2}), tmp_path / "run", resume=True)
    assert not stale.exists() and (tmp_path / "run" / runs.CHECKPOINT).is_file()


# --- faults in a real process ------------------------------------------------------------
FAULT_RECIPE = """
model = "vae"
seed = 0
threads = 1
[data]
name = "digits"
labels_per_class = 0
validation = 0.1
test = 0.2
binarize = true
[train]
epochs = 8
batch_size = 8
lr = 1e-3
progress = false
checkpoint_every = 1
[options]
z_dim = 4
hidden = [64]
"""


def _start(args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "pyrossl", "train", *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def _reference(tmp_path):
    from pyrossl.config import load_config

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(FAULT_RECIPE)
    train(load_config(recipe), tmp_path / "reference")
    return recipe


def test_killed_at_random_points_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    recipe = _reference(tmp_path)
    run, rng, kills = tmp_path / "run", random.Random(0), 0
    proc = _start([recipe, "--out", run], tmp_path)
    for _ in range(3):
        _wait_for(run / runs.CONFIG, proc)
        time.sleep(rng.uniform(0.0, 2.0))  # somewhere in training: a step, an evaluation, a checkpoint write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (run / runs.CHECKPOINT).exists():  # never corrupt: it always loads
            runs.load_checkpoint(run / runs.CHECKPOINT)
        proc = _start(["--resume", run] if runs.is_run(run) else [recipe, "--out", run], tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert kills >= 2
    _same_run(tmp_path / "reference", run)
    assert json.loads((run / runs.SUMMARY).read_text())["epochs"] == 8


def test_a_second_writer_of_a_run_is_refused_in_one_line_and_a_reader_is_served(tmp_path):
    """While a run trains: a second train into it, a resume of it and a report of it are each one line
    naming the holder, exit 2; eval reads it. The run goes on untouched, and its lock dies with it."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(FAULT_RECIPE)
    run = tmp_path / "run"
    proc = _start([recipe, "--out", run, "--set", "train.epochs=100"], tmp_path)
    _wait_for(run / runs.BEST, proc)
    for args in (["train", recipe, "--out", run, "--seed", "1"], ["train", "--resume", run], ["report", run]):
        other = subprocess.run(
            [sys.executable, "-m", "pyrossl", *map(str, args)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode == 2 and proc.poll() is None, (args, other.stderr)
        assert (
            other.stderr.startswith(f"pyrossl: error: {run} is in use by pid {proc.pid} on ")
            and other.stderr.count("\n") == 1
        )
    read = subprocess.run(
        [sys.executable, "-m", "pyrossl", "eval", str(run)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert read.returncode == 0 and "test_elbo" in read.stdout, read.stderr
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epochs = [r["epoch"] for r in runs.read_metrics(run)]
    assert epochs == list(range(1, len(epochs) + 1))  # one writer's records, in order
    runs.RunLock(run, "after the kill").acquire().release()  # the dead holder left no lock


# ``python DRIVER AT SIGNALS ARGS...``: ``pyrossl ARGS...`` in a process that sends itself SIGNALS
# (comma-separated numbers) as the AT-th file it writes gets its first bytes -- a checkpoint, best.pt,
# the metrics, the summary, a figure.
SIGNAL_DRIVER = """
import os, sys
from common import FileWrapper
from pyrossl import files
from pyrossl.cli import main

at, signums, count = int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",") if s], [0]
real = files._fdopen

class Signalling(FileWrapper):
    sent = False
    def write(self, data):
        if not self.sent:
            self.sent = True
            for signum in signums:
                os.kill(os.getpid(), signum)
        return self.file.write(data)

def opening(fd, mode):
    count[0] += 1
    return Signalling(real(fd, mode)) if count[0] == at else real(fd, mode)

files._fdopen = opening
sys.exit(main(sys.argv[3:]))
"""


def test_signals_inside_each_kind_of_write_are_one_line_and_the_resumed_run_ends_the_same(tmp_path, monkeypatch):
    """SIGINT or SIGTERM, once (stop after this step) or twice (stop at once), arriving while the
    n-th file of a run is being written. Each time: exit 130 or 143, one last line saying so and how
    to resume, no traceback, no temporary file, a checkpoint that loads, and a resume (or a fresh
    start, if the run had not begun) that ends exactly as the uninterrupted run. A bounded profile;
    PYROSSL_FAULTS=long tries every write with every pattern."""
    from pyrossl import files
    from pyrossl.config import load_config

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(FAULT_RECIPE.replace("epochs = 8", "epochs = 3"))
    real, written = files._fdopen, []
    monkeypatch.setattr(files, "_fdopen", lambda fd, mode: written.append(fd) or real(fd, mode))
    train(load_config(recipe), tmp_path / "reference")  # the same writes as the command's, counted
    monkeypatch.setattr(files, "_fdopen", real)
    total = len(written)
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_DRIVER)

    tests = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))  # for common

    def pyrossl(at, signums, *args):
        return subprocess.run(
            [sys.executable, str(driver), str(at), ",".join(str(int(s)) for s in signums), *map(str, args)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, "PYTHONPATH": tests},
        )

    patterns = [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGINT], [signal.SIGTERM, signal.SIGTERM]]
    if os.environ.get("PYROSSL_FAULTS") == "long":
        cases = [(at, p) for at in range(1, total + 1) for p in patterns]
    else:  # the run's first write (before any checkpoint), one in training, its last (after training)
        cases = [(1, patterns[1]), (random.Random(1).randint(2, total - 1), patterns[2]), (total, patterns[3])]
    for at, signums in cases:
        run = tmp_path / f"at-{at}-{'-'.join(signal.Signals(s).name for s in signums)}"
        done = pyrossl(at, signums, "train", recipe, "--out", run, "--quiet")
        code = 128 + int(signums[-1])
        assert done.returncode in (0, code), (at, signums, done.returncode, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (at, signums, done.stderr[-2000:])
        assert not list(run.glob(".*.tmp"))
        if done.returncode:
            last = done.stderr.strip().splitlines()[-1]
            assert last.startswith("pyrossl: interrupted"), (at, signums, done.stderr)
            if (run / runs.CHECKPOINT).exists():
                runs.load_checkpoint(run / runs.CHECKPOINT)
                assert f"resume with: pyrossl train --resume {run}" in last, last
        again = pyrossl(
            -1, [], "train", *(["--resume", run] if runs.is_run(run) else [recipe, "--out", run]), "--quiet"
        )
        assert again.returncode == 0, (at, signums, again.stderr[-2000:])
        _same_run(tmp_path / "reference", run)
        assert json.loads((run / runs.SUMMARY).read_text())["epochs"] == 3
    assert total >= 10


def test_writers_and_readers_started_together_on_one_folder_leave_one_run(tmp_path):
    """Three ``train`` of one recipe into one new folder, a ``train --resume``, a ``report`` and an
    ``eval`` of it, started together at random offsets (the race at a run's creation included). Each
    ends with exit 0, or exit 2 and one line; exactly one of the trainings trains; the folder ends as
    the uninterrupted run, its metrics one writer's. Once in ``make test``, five rounds under
    PYROSSL_FAULTS=long."""
    from pyrossl.config import load_config

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(FAULT_RECIPE.replace("epochs = 8", "epochs = 3"))
    train(load_config(recipe), tmp_path / "reference")
    rounds = 5 if os.environ.get("PYROSSL_FAULTS") == "long" else 1
    for seed in range(rounds):
        run, rng = tmp_path / f"race-{seed}", random.Random(seed)
        commands = [
            *[["train", recipe, "--out", run, "--quiet"]] * 3,
            ["train", "--resume", run, "--quiet"],
            ["report", run],
            ["eval", run],
        ]
        procs = []
        for args in rng.sample(commands, len(commands)):
            time.sleep(rng.uniform(0.0, 1.5))  # spread over a run's life: before, during and after its training
            procs.append(
                (
                    args,
                    subprocess.Popen(
                        [sys.executable, "-m", "pyrossl", *map(str, args)],
                        cwd=tmp_path,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )
        trained = 0
        for args, proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode in (0, 2), (args, proc.returncode, err[-2000:])
            if proc.returncode == 2:
                assert err.startswith("pyrossl: error: ") and err.count("\n") == 1, (args, err[-2000:])
            elif args[0] == "train" and args[1] != "--resume":
                trained += 1
        assert trained == 1, seed
        _same_run(tmp_path / "reference", run)
        assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_checkpoints_says_how_to_resume_and_the_resumed_run_ends_the_same(tmp_path, signum, code):
    recipe = _reference(tmp_path)
    run = tmp_path / "run"
    proc = _start([recipe, "--out", run], tmp_path)
    _wait_for(run / runs.METRICS, proc)
    deadline = time.monotonic() + 60
    while proc.poll() is None and not runs.read_metrics(run) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("pyrossl: interrupted ")
    assert f"resume with: pyrossl train --resume {run}" in err
    assert 1 <= runs.load_checkpoint(run / runs.CHECKPOINT)["counters"]["epoch"] < 8
    done = subprocess.run(
        [sys.executable, "-m", "pyrossl", "train", "--resume", str(run)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    _same_run(tmp_path / "reference", run)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizer_is_fused_on_cpu_and_takes_the_same_steps(name):
    config = tiny_config(**{"train.optimizer": name, "train.weight_decay": 0.01, "train.lr": 0.05})
    torch.manual_seed(0)
    start = torch.randn(7, 5)
    fused, loop = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt = make_optimizer(config, [fused])
    assert opt.defaults["fused"] is True
    reference = type(opt)([loop], lr=0.05, weight_decay=0.01, foreach=False)
    for _ in range(4):
        grad = torch.randn(7, 5)
        for p, o in ((fused, opt), (loop, reference)):
            p.grad = grad.clone()
            o.step()
    assert not torch.equal(fused, start)
    torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-6)


def test_a_labelled_batch_joins_every_nth_step(tmp_path):
    settings = {
        "model": "m2",
        "data.labels_per_class": 3,
        "train.batch_size": 64,
        "train.labelled_batch_size": 10,
        "options": {"z_dim": 4, "hidden": [32]},
    }
    every_step = Trainer(tiny_config(**settings), tmp_path / "a")
    every_step.setup()
    third = Trainer(tiny_config(**settings, **{"train.labelled_every": 3}), tmp_path / "b")
    third.setup()
    plain, sparse = every_step.schedule.epoch(every_step.generator), third.schedule.epoch(third.generator)
    assert all(lab is not None for _, lab in plain)
    assert [u.tolist() for u, _ in sparse] == [u.tolist() for u, _ in plain]  # the same unlabelled order
    assert [i for i, (_, lab) in enumerate(sparse) if lab is not None] == list(range(0, len(sparse), 3))
    labelled = set(third.split.labelled.tolist())
    drawn = [lab for _, lab in sparse if lab is not None]
    assert all(set(b.tolist()) <= labelled and len(b) == 10 for b in drawn)
    assert [b.tolist() for b in drawn] == [lab.tolist() for _, lab in plain[: len(drawn)]]  # the same label cycle
    # and it trains: the steps without labels score the unlabelled term alone
    summary = train(tiny_config(**settings, **{"train.labelled_every": 3, "train.epochs": 1}), tmp_path / "c")
    assert summary["steps"] == len(sparse) and math.isfinite(runs.read_metrics(tmp_path / "c")[0]["loss"])


def test_unused_parameters_are_probed_on_each_kind_of_step(tmp_path):
    settings = {
        "model": "m2",
        "data.labels_per_class": 3,
        "train.batch_size": 64,
        "train.labelled_batch_size": 10,
        "options": {"z_dim": 4, "hidden": [32]},
    }
    trainer = Trainer(tiny_config(**settings, **{"train.labelled_every": 3}), tmp_path / "run")
    trainer.setup()
    state = trainer.generator.get_state()
    steps = trainer.schedule.first_steps(trainer.generator)
    assert torch.equal(trainer.generator.get_state(), state)  # peeking does not move the batch order
    assert [lab is None for _, lab in steps] == [False, True]
    trials = [lambda step=step: trainer._loss(trainer.model, *step) for step in steps]
    probe = lambda: distributed.has_unused_parameters(trainer.model, trials, trainer.device)  # noqa: E731
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert probe() is False  # M2's unlabelled term alone reaches every parameter
    assert all(
        torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items()
    )  # the trial steps left no trace
    # a parameter that only the labelled steps reach is found by the step without labels
    trainer.model.guide.classifier.register_parameter("labelled_only", torch.nn.Parameter(torch.zeros(1)))
    forward = trainer.model.forward
    trainer.model.forward = lambda x, x_lab=None, y_lab=None: (
        forward(x, x_lab, y_lab) + (trainer.model.guide.classifier.labelled_only.sum() if x_lab is not None else 0)
    )
    assert probe() is True


# A fresh process frees a 16 MiB tensor it has written; prints whether tune_allocator changed malloc and
# how many MiB of resident memory the free gave back to the system.
_ALLOCATOR_SCRIPT = """
import os, sys, torch
from pyrossl.train import tune_allocator
tuned = tune_allocator()
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
block = torch.ones(4 << 20)  # 16 MiB, every page written
before = resident()
del block
print(tuned, round(before - resident(), 1))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only"
)
@pytest.mark.parametrize("setting", ["tuned", "default"])
def test_tuned_allocator_keeps_freed_step_memory_for_the_next_step(setting):
    env = {**os.environ, "PYROSSL_MALLOC": setting}
    env.pop("GLIBC_TUNABLES", None)
    done = subprocess.run(
        [sys.executable, "-c", _ALLOCATOR_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    tuned, returned = done.stdout.split()
    if setting == "tuned":  # the block came from the heap and stays there for reuse
        assert tuned == "True" and float(returned) < 2
    else:  # glibc's default: a block this size is mapped on its own and unmapped when freed
        assert tuned == "False" and float(returned) > 14


def _run_files(run):
    """The bytes of a run's files (its lock names whoever held it last: not the run's content)."""
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != runs.LOCK}


def test_a_resume_checks_every_counter_before_it_writes_anything(tmp_path, monkeypatch):
    """Nonsense counters or a nonsense position inside an epoch: one line naming the field, and every
    file of the run as it was (before: steps replayed or skipped, a summary of 1,000,000 epochs)."""
    config = tiny_config(**{"train.epochs": 3})
    with monkeypatch.context() as m:
        _stop_at_step(m, 14)  # inside epoch 2: the checkpoint has a partial epoch
        with pytest.raises(TrainingInterrupted):
            train(config, tmp_path / "run")
    path = tmp_path / "run" / runs.CHECKPOINT
    good = runs.load_checkpoint(path)
    assert good["partial"]["batch"] > 0
    damages = [
        ("counters", "epoch", 1e6, "counters.epoch is 1000000.0"),
        ("counters", "epoch", -1, "counters.epoch is -1"),
        ("counters", "epoch", 1_000_000, "not 0 .. 3"),
        ("counters", "step", "12", "counters.step is '12'"),
        ("counters", "skipped", 99, "counters.skipped is 99"),
        ("counters", "best_score", math.nan, "best_score is nan"),
        ("counters", "best_epoch", 2, "best_epoch is 2, not 0 .. 1"),
        ("counters", "seconds", -3.0, "seconds is -3.0"),
        ("partial", "batch", -15, "partial.batch is -15"),
        ("partial", "batch", 10**6, "stopped after batch 1000000, but the epoch has"),
        ("partial", "epoch", 3, "partial.epoch is 3"),
        ("partial", "losses", [math.inf], "partial.losses"),
        ("partial", "data_rng", torch.zeros(3), "partial.data_rng"),
    ]
    for part, key, value, message in damages:
        state = {**good, part: {**good[part], key: value}}
        runs.atomic_save(state, path)
        before = _run_files(tmp_path / "run")
        with pytest.raises(CheckpointError, match=re.escape(message)):
            train(config, tmp_path / "run", resume=True)
        assert _run_files(tmp_path / "run") == before, key
    runs.atomic_save(good, path)
    train(config, tmp_path / "run", resume=True)  # the real one resumes
    assert runs.read_summary(tmp_path / "run")["epochs"] == 3


def test_resume_reads_every_run_file_before_loading_data(tmp_path, monkeypatch):
    train(tiny_config(**{"train.epochs": 1}), tmp_path / "run")
    (tmp_path / "run" / runs.BEST).write_bytes(b"damaged")
    before = _run_files(tmp_path / "run")

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the run's files were checked")

    monkeypatch.setattr(runs, "load_dataset_for", no_data)
    with pytest.raises(CheckpointError, match="best.pt is not a readable checkpoint.*delete it to resume"):
        train(tiny_config(**{"train.epochs": 1}), tmp_path / "run", resume=True)
    assert before == _run_files(tmp_path / "run")


# --- learning-rate schedules and early stopping -------------------------------------------------------
def test_the_cosine_and_step_schedules_set_each_epochs_learning_rate(tmp_path):
    lr, low = 3e-3, 1e-4
    for schedule, expected in (
        ("cosine", [low + (lr - low) * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]),
        ("step", [lr, lr, lr * 0.5, lr * 0.5]),
        ("constant", [None] * 4),  # no schedule: no lr in the records
    ):
        config = tiny_config(
            **{
                "train.epochs": 4,
                "train.lr": lr,
                "train.lr_schedule": schedule,
                "train.lr_min": low,
                "train.lr_step_epochs": 2,
                "train.lr_factor": 0.5,
            }
        )
        out = tmp_path / schedule
        train(config, out)
        got = [r.get("lr") for r in runs.read_metrics(out)]
        assert got == pytest.approx(expected, rel=1e-12) if expected[0] else got == expected, schedule


def test_a_stepped_schedule_resumes_where_it_was(tmp_path):
    settings = {"train.lr_schedule": "step", "train.lr_step_epochs": 1, "train.lr_factor": 0.5}
    train(tiny_config(**{**settings, "train.epochs": 2}), tmp_path / "short")
    train(tiny_config(**{**settings, "train.epochs": 4}), tmp_path / "short", resume=True)  # extended
    train(tiny_config(**{**settings, "train.epochs": 4}), tmp_path / "long")
    short, long = (runs.read_metrics(tmp_path / name) for name in ("short", "long"))
    assert [r["lr"] for r in short] == [r["lr"] for r in long] == [3e-3, 1.5e-3, 7.5e-4, 3.75e-4]
    a, b = (runs.load_checkpoint(tmp_path / n / runs.CHECKPOINT) for n in ("short", "long"))
    assert a["scheduler"] == b["scheduler"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def _scores(monkeypatch, values):
    """Make every evaluated epoch's validation ELBO ``values[epoch - 1]`` (the selection metric of the VAE)."""
    monkeypatch.setattr(Trainer, "_score", lambda self, epoch: {"val_elbo": float(values[epoch - 1])})


def test_plateau_decays_after_lr_step_epochs_evaluated_epochs_without_a_better_metric(tmp_path, monkeypatch):
    _scores(monkeypatch, [1, 2, 2, 2, 3, 3, 3, 3])  # better at epochs 1, 2 and 5
    settings = {"train.lr_schedule": "plateau", "train.lr_step_epochs": 2, "train.lr_factor": 0.5}
    train(tiny_config(**{**settings, "train.epochs": 8, "train.lr": 0.004}), tmp_path / "run")
    lrs = [r["lr"] for r in runs.read_metrics(tmp_path / "run")]
    # epochs 3 and 4 not better: the decay after epoch 4; 6 and 7: after epoch 7
    assert lrs == pytest.approx([0.004] * 4 + [0.002] * 3 + [0.001], rel=1e-12)
    # the evaluated epochs step it: how often they come is part of training under plateau
    with pytest.raises(CheckpointError, match="differs in train.eval_every"):
        train(tiny_config(**{**settings, "train.epochs": 8, "train.eval_every": 2}), tmp_path / "run", resume=True)


def test_patience_stops_early_says_why_and_a_larger_one_goes_on(tmp_path, monkeypatch):
    _scores(monkeypatch, [1, 2, 2, 2, 2, 2, 2, 2, 2, 2])  # the best at epoch 2
    out = tmp_path / "run"
    summary = train(tiny_config(**{"train.epochs": 10, "train.patience": 3}), out)
    assert summary["epochs"] == 5 and summary["best_epoch"] == 2  # epochs 3, 4, 5 were not better
    assert summary["stopped_early"] == {
        "epoch": 5,
        "best_epoch": 2,
        "patience": 3,
        "reason": "no better val_elbo in 3 evaluated epochs",
    }
    assert runs.read_summary(out) == summary and [r["epoch"] for r in runs.read_metrics(out)][-1] == 5
    before = (out / runs.CHECKPOINT).read_bytes()
    assert train_to_completion(tiny_config(**{"train.epochs": 10, "train.patience": 3}), out) == summary  # done
    assert (out / runs.CHECKPOINT).read_bytes() == before
    # a larger patience is a resume that goes on (patience may change on resume): two more epochs
    summary = train(tiny_config(**{"train.epochs": 10, "train.patience": 5}), out, resume=True)
    assert summary["epochs"] == 7 and summary["stopped_early"]["patience"] == 5
    # none at all: to the last epoch
    assert "stopped_early" not in train(tiny_config(**{"train.epochs": 10}), out, resume=True)


def test_a_schedule_or_patience_that_watches_a_missing_validation_part_is_refused(tmp_path):
    for settings, key in (
        ({"train.patience": 2}, "train.patience"),
        ({"train.lr_schedule": "plateau"}, "train.lr_schedule = plateau"),
    ):
        with pytest.raises(ConfigError, match=f"{re.escape(key)} watches the selection metric .* set data.validation"):
            train(tiny_config(**{**settings, "data.validation": 0}), tmp_path / key)
    for key, value, message in (
        ("train.lr_schedule", "linear", "unknown train.lr_schedule 'linear' .valid: constant, cosine, step, plateau."),
        ("train.lr_factor", 1.5, "train.lr_factor must be in .0, 1., not 1.5"),
        ("train.lr_min", 0.5, "train.lr_min must be at least 0 and below train.lr"),
        ("train.lr_step_epochs", 0, "train.lr_step_epochs must be at least 1"),
        ("train.patience", 0, "train.patience must be at least 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            tiny_config(**{key: value})
