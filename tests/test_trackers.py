"""Experiment trackers, read back with each library's own reader and compared with metrics.jsonl."""

import csv

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common import tiny_config
from pyrossl import runs
from pyrossl.errors import ConfigError
from pyrossl.trackers import CSV_FILE, TENSORBOARD_DIR, TensorBoardTracker
from pyrossl.train import Trainer, train

LOGGERS = {"train.loggers": ["csv", "tensorboard"]}


def _board(run):
    events = EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _scalars(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_csv_and_tensorboard_mirror_metrics_jsonl(tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config(**{**LOGGERS, "train.epochs": 3, "train.figures": True}), run)
    records = runs.read_metrics(run)
    rows = list(csv.DictReader((run / CSV_FILE).open()))
    assert [int(r["epoch"]) for r in rows] == [r["epoch"] for r in records]
    for row, record in zip(rows, records):
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(row[key]) == pytest.approx(value, rel=1e-12), key

    events = _board(run)
    ends = [step for step, _ in _scalars(events, "epoch/epoch")]
    assert ends[-1] == summary["steps"] and ends == sorted(ends)  # each epoch at the steps that end it
    for key in ("loss", "val_elbo", "train_seconds"):
        assert [v for _, v in _scalars(events, f"epoch/{key}")] == pytest.approx([r[key] for r in records], rel=1e-6)
    steps = _scalars(events, "loss/step")
    assert [s for s, _ in steps] == list(range(1, summary["steps"] + 1))
    mean_first = sum(v for s, v in steps if s <= ends[0]) / ends[0]  # the epoch's loss is its steps' mean
    assert mean_first == pytest.approx(records[0]["loss"], rel=1e-5)
    drawn = {p.stem for p in (run / runs.FIGURES).glob("*.png")}
    assert {t.removeprefix("figures/") for t in events.Tags()["images"]} == drawn and "latent_pca" in drawn
    assert _scalars(events, "best/test_elbo")[0][1] == pytest.approx(summary["best"]["test_elbo"], rel=1e-6)
    assert "_hparams_/experiment" in events.summary_metadata or any(
        "hparams" in t for t in events.Tags()["tensors"]
    )  # the recipe as hyper-parameters


def test_a_resumed_run_writes_each_step_and_epoch_once(tmp_path, monkeypatch):
    run = tmp_path / "run"
    config = tiny_config(**{**LOGGERS, "train.epochs": 4, "train.eval_every": 2, "train.checkpoint_every": 2})
    real_score = Trainer._score

    def crash_at_epoch_4(self, epoch):  # a crash after epoch 3 was logged but never checkpointed
        if epoch == 4:
            raise RuntimeError("the machine went away")
        return real_score(self, epoch)

    monkeypatch.setattr(Trainer, "_score", crash_at_epoch_4)
    with pytest.raises(RuntimeError, match="went away"):
        train(config, run)
    monkeypatch.setattr(Trainer, "_score", real_score)
    summary = train(config, run, resume=True)
    train(config, tmp_path / "straight")
    events, straight = _board(run), _board(tmp_path / "straight")
    assert [s for s, _ in _scalars(events, "loss/step")] == list(range(1, summary["steps"] + 1))  # once each
    assert [e for _, e in _scalars(events, "epoch/epoch")] == [1, 2, 3, 4]
    assert _scalars(events, "epoch/loss") == _scalars(straight, "epoch/loss")
    assert [int(r["epoch"]) for r in csv.DictReader((run / CSV_FILE).open())] == [1, 2, 3, 4]


def test_a_failing_tracker_is_one_warning_and_training_goes_on(tmp_path, monkeypatch, capsys):
    def gone(self, step, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardTracker, "epoch", gone)
    summary = train(tiny_config(**{**LOGGERS, "train.epochs": 3}), tmp_path / "run")
    assert summary["epochs"] == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "pyrossl: warning: the tensorboard tracker failed ([Errno 28] No space left on device); "
        "training goes on without it"
    ]
    assert len(list(csv.DictReader((tmp_path / "run" / CSV_FILE).open()))) == 3  # the others go on


def test_trackers_are_checked_before_training(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'wandb' in train.loggers .valid: csv, tensorboard, mlflow."):
        tiny_config(**{"train.loggers": ["wandb"]})
    with pytest.raises(ConfigError, match="names a tracker twice"):
        tiny_config(**{"train.loggers": ["csv", "csv"]})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the tensorboard package: pip install 'pyrossl\[tensorboard\]'"):
        train(tiny_config(**LOGGERS), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # said before a step


def _mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri)


def test_mlflow_holds_one_run_per_zoo_run_with_its_recipe_metrics_and_figures(tmp_path):
    uri, client = _mlflow(tmp_path)
    settings = {"train.loggers": ["mlflow"], "train.tracking_uri": uri, "train.figures": True}
    run = tmp_path / "run"
    train(tiny_config(**{**settings, "train.epochs": 2}), run)
    train(tiny_config(**{**settings, "train.epochs": 3}), run, resume=True)  # extended: the same MLflow run
    experiment = client.get_experiment_by_name("pyrossl")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.params["train.lr"] == "0.003" and found.data.params["model"] == "vae"
    records = runs.read_metrics(run)
    history = client.get_metric_history(found.info.run_id, "val_elbo")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], pytest.approx(r["val_elbo"])) for r in records]
    summary = runs.read_summary(run)
    assert found.data.metrics["best_test_elbo"] == pytest.approx(summary["best"]["test_elbo"])
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id, "figures")}
    assert "figures/latent_pca.png" in artifacts and (tmp_path / "mlartifacts" / "pyrossl").is_dir()


def test_an_ablation_is_one_mlflow_experiment_with_a_run_per_cell(tmp_path):
    from test_ablate import RECIPE, TINY

    from pyrossl.ablate import ablate

    uri, client = _mlflow(tmp_path)
    settings = [*TINY, 'train.loggers=["mlflow"]', f"train.tracking_uri={uri!r}", "train.figures=false"]
    ablate(RECIPE, tmp_path / "guides-abl", guides=["enum", "gumbel"], overrides=settings, iwae=0)
    experiment = client.get_experiment_by_name("guides-abl")
    found = client.search_runs([experiment.experiment_id], order_by=["attributes.run_name"])
    assert [(r.info.run_name, r.data.params["guide"]) for r in found] == [
        ("guide-enum-seed0", "enum"),
        ("guide-gumbel-seed0", "gumbel"),
    ]
    assert all("val_accuracy" in r.data.metrics for r in found)


def test_an_unreachable_mlflow_server_is_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    settings = {"train.loggers": ["csv", "mlflow"], "train.tracking_uri": "http://127.0.0.1:9", "train.epochs": 2}
    assert train(tiny_config(**settings), tmp_path / "run")["epochs"] == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("pyrossl: warning: the mlflow tracker failed (")
    assert (tmp_path / "run" / CSV_FILE).exists()
