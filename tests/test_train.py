import json
import math

import pytest
import torch

from conftest import tiny_config
from pyrossl import runs
from pyrossl.errors import CheckpointError, ConfigError, TrainingError
from pyrossl.train import Trainer, train, train_to_completion


def _params(run_dir, name=runs.CHECKPOINT):
    return runs.load_checkpoint(run_dir / name)["model"]


def test_run_directory_is_complete(tmp_path):
    summary = train(tiny_config(**{"train.iwae_samples": 5}), tmp_path / "run")
    run = tmp_path / "run"
    for name in (runs.CONFIG, runs.METRICS, runs.SUMMARY, runs.CHECKPOINT, runs.BEST):
        assert (run / name).is_file(), name
    for figure in ("loss.png", "metrics.png", "latent_pca.png", "reconstructions.png", "samples.png"):
        assert (run / "figures" / figure).stat().st_size > 0, figure
    saved = json.loads((run / runs.SUMMARY).read_text())
    for key in ("model", "guide", "dataset", "seed", "epochs", "seconds", "best_epoch", "test_elbo", "test_log_likelihood"):
        assert key in saved, key
    assert saved["guide"] == "diag-normal" and saved["epochs"] == 3
    assert summary["last"]["test_elbo"] == saved["last"]["test_elbo"]
    records = runs.read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and "val_elbo" in r and "test_elbo" in r for r in records)
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
    config = tiny_config(**{"train.epochs": 4, "data.binarize": True})
    train(config, tmp_path / "full")
    # stop after two epochs, then resume to four
    train(tiny_config(**{"train.epochs": 2, "data.binarize": True}), tmp_path / "part")
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
    [("train.batch_size", 0, "batch_size must be at least 1"), ("train.epochs", 0, "epochs must be at least 1"),
     ("train.optimizer", "adagrad", "unknown optimizer"), ("device", "tpu", "unknown device")],
)
def test_bad_training_settings(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(**{key: value}), tmp_path / "run")


def test_cuda_requested_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        train(tiny_config(device="cuda"), tmp_path / "run")


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
    monkeypatch.setattr(VAE, "evaluate", lambda self, x, y, batch_size=1000: {**evaluate(self, x, y, batch_size), "elbo": float("nan")})
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
