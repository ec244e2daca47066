"""Experiment trackers: a run's losses, metrics, figures and recipe, beside ``metrics.jsonl``.

``train.loggers = ["csv", "tensorboard", "mlflow"]`` names the trackers a run writes to, each with the
real package (the optional extras ``pyrossl[tensorboard]``, ``pyrossl[mlflow]``):

- ``csv``: ``metrics.csv`` in the run directory, one row per epoch, a column per numeric key of
  ``metrics.jsonl`` (what a spreadsheet or ``pandas.read_csv`` opens);
- ``tensorboard``: event files in ``<run>/tensorboard`` (``tensorboard --logdir <run>``): the loss of
  every step (``loss/step``), each epoch's record (the loss, the learning rate, the validation metrics,
  ``train_seconds``...) at the step count that ends the epoch, the figures as images and the recipe as
  hyper-parameters (TensorBoard's HParams tab, with the best epoch's metrics) when the run ends;
- ``mlflow``: one MLflow run per zoo run (named after its folder) in the experiment
  ``train.experiment`` (default ``pyrossl``; an ablation's cells: the ablation's folder name), at
  ``train.tracking_uri`` (default ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working
  folder, its artifacts in ``mlartifacts/`` beside it: ``mlflow ui`` there shows them): the recipe as
  parameters, each epoch's record as metrics at step = epoch, the best epoch's as ``best_<key>``, the
  figures as artifacts. Its run id is kept in ``<run>/mlflow.json``, so a resume logs to the same run.

``metrics.jsonl`` stays the record the zoo reads; a tracker only mirrors it. A tracker that fails
(a full disk, a package that raises) is one warning line and is dropped: training goes on. A resumed
run writes to the same tracker run: the CSV is rewritten from the records a resume keeps, and
TensorBoard hides what was logged after the checkpoint (``purge_step``), so each step and epoch
appears once.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from pathlib import Path

from pyrossl import runs
from pyrossl.config import dotted
from pyrossl.errors import ConfigError

#: the package each tracker needs (an optional extra of pyrossl)
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
#: where each tracker writes inside the run directory
CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_FILE = "mlflow.json"


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Tracker:
    """What a tracker is told: the run starts (or resumes at ``step``), a step's loss, an epoch's record
    (logged at ``step``, the steps taken when the epoch ended), the figures and summary at the end."""

    name = ""

    def start(self, run_dir: Path, config, resumed_at_step: int | None) -> None:
        pass

    def step(self, step: int, loss: float) -> None:
        pass

    def epoch(self, step: int, record: dict) -> None:
        pass

    def finish(self, summary: dict, figures: list[Path]) -> None:
        pass

    def close(self) -> None:
        pass


class CSVTracker(Tracker):
    """``metrics.csv``: every numeric key of ``metrics.jsonl``'s records, one row per epoch."""

    name = "csv"

    def start(self, run_dir, config, resumed_at_step):
        self.run_dir = Path(run_dir)
        self._write()  # a resume: the rows of the records it keeps

    def epoch(self, step, record):
        self._write()

    def _write(self) -> None:
        records = runs.read_metrics(self.run_dir)
        keys = list(dict.fromkeys(k for r in records for k, v in r.items() if _scalar(v)))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: v for k, v in r.items() if _scalar(v)} for r in records)
        runs.atomic_write_text(self.run_dir / CSV_FILE, buf.getvalue())


class TensorBoardTracker(Tracker):
    """Event files in ``<run>/tensorboard`` through ``torch.utils.tensorboard`` (the ``tensorboard`` package)."""

    name = "tensorboard"

    def start(self, run_dir, config, resumed_at_step):
        from torch.utils.tensorboard import SummaryWriter

        self.config = config
        # a resume hides every event at or after the checkpoint's step: those steps are trained again
        self.writer = SummaryWriter(
            log_dir=str(Path(run_dir) / TENSORBOARD_DIR),
            purge_step=None if resumed_at_step is None else resumed_at_step + 1,
        )

    def step(self, step, loss):
        if math.isfinite(loss):
            self.writer.add_scalar("loss/step", loss, step)

    def epoch(self, step, record):
        for key, value in record.items():
            if key != "epoch" and _scalar(value):
                self.writer.add_scalar(f"epoch/{key}", value, step)
        self.writer.add_scalar("epoch/epoch", record["epoch"], step)
        self.writer.flush()

    def finish(self, summary, figures):
        import numpy as np
        from PIL import Image
        from torch.utils.tensorboard.summary import hparams

        for path in figures:
            if path.suffix == ".png":
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(f"figures/{path.stem}", pixels, summary["steps"], dataformats="HWC")
        recipe = dotted(self.config.to_dict())  # TensorBoard's hyper-parameters are numbers, strings or booleans
        params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in recipe.items()}
        metrics = {f"best/{k}": v for k, v in summary["best"].items() if _scalar(v)}
        for summary_proto in hparams(params, metrics):
            self.writer.file_writer.add_summary(summary_proto)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, summary["steps"])
        self.writer.flush()

    def close(self):
        self.writer.close()


class MLflowTracker(Tracker):
    """One MLflow run per zoo run, through ``mlflow.tracking.MlflowClient`` (no global MLflow state)."""

    name = "mlflow"

    def start(self, run_dir, config, resumed_at_step):
        import json
        import os

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        t = config.train
        uri = t.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        self.finished = False
        kept = Path(run_dir) / MLFLOW_FILE
        saved = json.loads(kept.read_text()) if kept.exists() else {}
        if saved.get("tracking_uri") == uri:  # a resume: the same MLflow run goes on
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = t.experiment or "pyrossl"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # a sqlite store keeps its artifacts beside the database file, not in the working folder
            store = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
            location = (Path(store).parent / "mlartifacts" / name).as_uri() if store else None
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        run = self.client.create_run(
            experiment_id, run_name=Path(run_dir).name, tags={"pyrossl.run_dir": str(Path(run_dir).absolute())}
        )
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in sorted(dotted(config.to_dict()).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        runs.atomic_write_text(kept, json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")

    def epoch(self, step, record):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, record["epoch"]) for k, v in record.items() if k != "epoch" and _scalar(v)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary, figures):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        best = [Metric(f"best_{k}", float(v), now, summary["epochs"]) for k, v in summary["best"].items() if _scalar(v)]
        self.client.log_batch(self.run_id, metrics=best)
        for path in figures:
            self.client.log_artifact(self.run_id, str(path), artifact_path="figures")
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    def close(self):
        if hasattr(self, "run_id") and not self.finished:  # stopped or failed: a resume sets it running again
            self.client.set_terminated(self.run_id, "KILLED")


def make_tracker(name: str) -> Tracker:
    return {"csv": CSVTracker, "tensorboard": TensorBoardTracker, "mlflow": MLflowTracker}[name]()


class Trackers:
    """The run's trackers (rank 0 alone writes); a tracker that raises is one warning line on stderr and
    is dropped, so a tracker never stops training."""

    def __init__(self, names: list[str]):
        import importlib.util

        for name in names:
            package = PACKAGES.get(name)
            if package and importlib.util.find_spec(package) is None:
                raise ConfigError(
                    f"train.loggers names {name}, which needs the {package} package: pip install 'pyrossl[{name}]'"
                )
        self.trackers = [make_tracker(n) for n in names]

    def _each(self, what: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, what)(*args)
            except Exception as exc:  # noqa: BLE001 - any failure of a tracker is only a warning
                self.trackers.remove(tracker)
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                print(
                    f"pyrossl: warning: the {tracker.name} tracker failed ({message}); training goes on without it",
                    file=sys.stderr,
                )
                try:
                    tracker.close()
                except Exception:  # noqa: BLE001, S110 - it failed already; closing is best effort
                    pass

    def start(self, run_dir: Path, config, resumed_at_step: int | None) -> None:
        self._each("start", run_dir, config, resumed_at_step)

    def step(self, step: int, loss: float) -> None:
        self._each("step", step, loss)

    def epoch(self, step: int, record: dict) -> None:
        self._each("epoch", step, record)

    def finish(self, summary: dict, figures: list[Path]) -> None:
        self._each("finish", summary, figures)

    def close(self) -> None:
        self._each("close")
