"""Data-parallel training: real processes launched by torchrun (gloo, loopback), and the one-process no-ops."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from common import tiny_config
from pyrossl import distributed, runs
from pyrossl.errors import TrainingInterrupted
from pyrossl.run import load_run
from pyrossl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# Trains a config (JSON, argv[1]) into argv[2] and saves this process's final entry state to argv[3]/rank<R>.pt,
# and the sizes of the sets it evaluated to argv[3]/rows<R>.json.
SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from pyrossl.config import config_from_dict
    from pyrossl.train import Trainer
    rows = []
    class Counting(Trainer):
        def setup(self):
            super().setup()
            counts = self.model.evaluation_counts
            def counting(x, y, batch_size=1000):
                rows.append(x.shape[0])
                return counts(x, y, batch_size)
            self.model.evaluation_counts = counting
    trainer = Counting(config_from_dict(json.loads(open(sys.argv[1]).read())), sys.argv[2], resume=len(sys.argv) > 4)
    trainer.fit()
    rank = os.environ.get("RANK", "0")
    torch.save(trainer.model.state_dict(), os.path.join(sys.argv[3], "rank%s.pt" % rank))
    open(os.path.join(sys.argv[3], "rows%s.json" % rank), "w").write(json.dumps(rows))
    from pyrossl import distributed
    sys.exit(distributed.end_process(0))
""")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, config, out, nproc=2, resume=False):
    """Run SCRIPT on ``nproc`` processes (torchrun, one machine); returns each rank's final state."""
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "script.py").write_text(SCRIPT)
    dump = tmp_path / f"states-{nproc}-{out.name}"
    dump.mkdir(exist_ok=True)
    args = [str(tmp_path / "config.json"), str(out), str(dump)] + (["resume"] if resume else [])
    done = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), str(tmp_path / "script.py"), *args],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[:3000] + "\n...\n" + done.stderr[-3000:]
    assert "Warning" not in done.stderr, done.stderr[-3000:]  # e.g. a deprecated DistributedDataParallel argument
    return [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def _config(**overrides):
    return tiny_config(**{"train.epochs": 2, "train.batch_size": 64, **overrides})


def test_one_process_is_a_no_op():
    assert not distributed.context().active and distributed.is_writer()
    index = torch.arange(7)
    assert distributed.shard(index) is index and distributed.loss_scale(3, 7) == 1.0
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.all_true(False) is False
    assert distributed.sum_over_processes([1.0, 2.0]) == [1.0, 2.0]
    assert distributed.sum_counts(None) is None and distributed.end_process(3) == 3  # no job: nothing ends


def test_shards_cover_a_batch_once_and_weights_make_the_global_mean(monkeypatch):
    monkeypatch.setattr(distributed, "_context", distributed.Context(rank=0, world_size=3))
    batch = torch.arange(10)
    parts = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "_context", distributed.Context(rank=rank, world_size=3))
        parts.append(distributed.shard(batch))
    assert torch.equal(torch.cat(parts), batch) and [p.numel() for p in parts] == [4, 3, 3]
    # DDP averages over 3 processes: sum_r scale_r * mean_r / 3 = global mean
    scales = [3 * p.numel() / 10 for p in parts]
    values = torch.rand(10)
    averaged = sum(s * values[p].mean() for s, p in zip(scales, parts)) / 3
    assert averaged.item() == pytest.approx(values.mean().item())
    assert distributed.loss_scale(0, 2) == 0.0


def test_two_processes_end_identical_and_write_one_run_directory(tmp_path):
    out = tmp_path / "run"
    config = _config(
        **{
            "model": "gae",
            "data.labels_per_class": None,
            "train.eval_test": True,  # every evaluation counts the validation and the test part
            "train.figures": True,  # rank 0 alone draws them
            "options": {"z_dim": 3, "hidden": [16], "components": 2},
        }
    )
    states = _launch(tmp_path, config, out)
    assert states[0].keys() == states[1].keys()
    for key in states[0]:  # parameters, and the mixtures fitted once on rank 0 and broadcast
        assert torch.equal(states[0][key], states[1][key]), key
    assert sorted(p.name for p in out.iterdir()) == [
        runs.LOCK,
        "best.pt",
        "checkpoint.pt",
        "config.toml",
        "figures",
        "metrics.jsonl",
        "summary.json",
    ]
    assert [r["epoch"] for r in runs.read_metrics(out)] == [1, 2]  # one writer
    summary = runs.read_summary(out)
    assert summary["processes"] == 2 and 0 <= summary["test_accuracy"] <= 1
    saved = runs.load_checkpoint(out / runs.CHECKPOINT)["model"]
    assert all(torch.equal(saved[k], states[0][k]) for k in saved)
    # evaluation was split: each process counted one half of each set, and the sums give one process's metrics
    dump = tmp_path / "states-2-run"
    rows = [json.loads((dump / f"rows{r}.json").read_text()) for r in (0, 1)]
    run = load_run(out, "last")
    sizes = [run.split.validation.numel(), run.split.test.numel()]
    assert [a + b for a, b in zip(*rows)] == sizes * (len(rows[0]) // 2) and all(abs(a - b) <= 1 for a, b in zip(*rows))
    for part, prefix in (("validation", "val_"), ("test", "test_")):
        x, y = run.tensors(part)
        for key, value in run.model.evaluate(x, y).items():
            assert summary["last"][prefix + key] == pytest.approx(value, rel=1e-6, nan_ok=True), key  # float32 sums


def test_two_processes_train_the_new_guides_and_write_the_kl_of_each_unit(tmp_path):
    """M2 with the Dirichlet label latent and a flow z-guide: identical ranks, a checkpoint load_run reloads,
    and the per-unit KL summed over the processes' shares of the validation set."""
    out = tmp_path / "run"
    config = _config(
        **{
            "model": "m2",
            "guide": "dirichlet",
            "z_guide": "flow",
            "data.labels_per_class": 5,
            "options": {"z_dim": 3, "hidden": [16], "flow_hidden": [8]},
        }
    )
    states = _launch(tmp_path, config, out)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any("z_guide.maps" in k for k in states[0]) and load_run(out, "last").model.z_guide_name == "flow"
    last = runs.read_metrics(out)[-1]
    assert len(last["val_kl_per_unit"]) == 3 and 0 <= last["val_active_units"] <= 3


def test_two_processes_train_the_adgm_to_identical_ranks_that_load_run_reloads(tmp_path):
    """The ADGM: a drawn before the enumerated y on each rank, gradients averaged by DDP."""
    out = tmp_path / "run"
    config = _config(
        **{"model": "adgm", "data.labels_per_class": 5, "options": {"z_dim": 3, "a_dim": 2, "hidden": [16]}}
    )
    states = _launch(tmp_path, config, out)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    run = load_run(out, "last")
    x, y = run.tensors("test")
    assert run.model.name == "adgm" and run.model.evaluate(x, y)["accuracy"] == pytest.approx(
        runs.read_summary(out)["last"]["test_accuracy"]
    )


def test_two_processes_train_m1m2_from_the_same_m1(tmp_path):
    """M1 trained first on every rank from the same seed (DDP then starts all ranks from rank 0's
    parameters), frozen: DDP averages the gradients of M2's parameters only."""
    out = tmp_path / "run"
    config = _config(
        **{
            "model": "m1m2",
            "data.labels_per_class": 5,
            "options": {"z_dim": 3, "hidden": [16], "m1_z_dim": 3, "m1_hidden": [16], "m1_epochs": 2},
        }
    )
    states = _launch(tmp_path, config, out)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(k.startswith("model.m1.") for k in states[0])
    run = load_run(out, "last")
    x, y = run.tensors("test")
    assert run.model.evaluate(x, y)["accuracy"] == pytest.approx(runs.read_summary(out)["last"]["test_accuracy"])


def test_two_processes_with_half_batches_match_one_process_with_whole_batches(tmp_path):
    """A model without sampling noise: DDP's averaged gradients equal the gradients of the global batch."""
    config = _config(
        **{
            "model": "classifier",
            "data.labels_per_class": None,
            "train.epochs": 3,
            "train.batch_size": 50,
            "options": {"hidden": [32]},
        }
    )
    two = _launch(tmp_path, config, tmp_path / "two")
    one = Trainer(config, tmp_path / "one")
    one.fit()
    reference = one.model.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(two[0][key], value, rtol=1e-4, atol=1e-5)
    steps = runs.read_summary(tmp_path / "one")["steps"]
    assert steps == runs.read_summary(tmp_path / "two")["steps"] > 50  # several steps, with a short last batch


def test_a_one_process_checkpoint_resumes_on_two_processes(tmp_path):
    config = _config(**{"train.epochs": 4})

    class StopsAfterEpochTwo(Trainer):
        def _end_epoch(self, epoch, evaluate):
            self.stop.signum = signal.SIGINT if epoch == 2 else 0
            return super()._end_epoch(epoch, evaluate)

    with pytest.raises(TrainingInterrupted, match="after epoch 2"):
        StopsAfterEpochTwo(config, tmp_path / "run").fit()
    states = _launch(tmp_path, config, tmp_path / "run", resume=True)
    assert [r["epoch"] for r in runs.read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [v.split(b"=", 1)[1] for v in env if v.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


NONFINITE = textwrap.dedent("""
    import json, os, sys, torch
    from pyrossl import distributed
    from pyrossl.config import config_from_dict
    from pyrossl.train import Trainer
    class NanOnRankOne(Trainer):  # rank 1 alone gets a non-finite loss at its 3rd and 5th steps
        def setup(self):
            super().setup()
            forward = self.model.forward
            def nan_sometimes(*args, **kwargs):
                loss = forward(*args, **kwargs)
                return loss * float("nan") if distributed.context().rank == 1 and self.progress.step in (2, 4) else loss
            self.model.forward = nan_sometimes
    trainer = NanOnRankOne(config_from_dict(json.loads(open(sys.argv[1]).read())), sys.argv[2])
    trainer.fit()
    torch.save(trainer.model.state_dict(), os.path.join(sys.argv[3], "rank%s.pt" % os.environ["RANK"]))
    sys.exit(distributed.end_process(0))
""")


def test_a_non_finite_loss_in_one_process_is_skipped_by_all(tmp_path):
    config = _config(**{"train.on_nonfinite": "skip", "train.epochs": 1})
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "script.py").write_text(NONFINITE)
    done = subprocess.run(
        [
            *TORCHRUN,
            "--standalone",
            "--nproc-per-node",
            "2",
            str(tmp_path / "script.py"),
            str(tmp_path / "config.json"),
            str(tmp_path / "run"),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # the same steps were skipped everywhere
    assert runs.read_summary(tmp_path / "run")["skipped_steps"] == 2


def _job_past_its_first_checkpoint(tmp_path, epochs: int, batch_size: int, seed: int = 0):
    """``pyrossl train --nproc 2`` of a small VAE recipe, started and waited on until its first
    checkpoint exists; returns the process (the launcher), the recipe and the run directory."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'model = "vae"\nseed = {seed}\n[data]\nname = "digits"\nlabels_per_class = 0\n'
        f"[train]\nepochs = {epochs}\nbatch_size = {batch_size}\nprogress = false\n[options]\nz_dim = 4\nhidden = "
        "[32]\n"
    )
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyrossl", "train", str(recipe), "--out", str(out), "--nproc", "2"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / runs.CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before its first checkpoint could be seen"
    return proc, recipe, out


def test_a_killed_process_stops_the_others_with_a_message_and_the_run_resumes(tmp_path):
    proc, recipe, out = _job_past_its_first_checkpoint(tmp_path, epochs=60, batch_size=32)
    victims = [pid for pid in _children(proc.pid) if _rank_of(pid) == 1]
    assert proc.poll() is None and victims, "the run ended before a process could be killed"
    os.kill(victims[0], signal.SIGKILL)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=90)
    assert time.monotonic() - killed < 60
    assert proc.returncode == 1
    assert "pyrossl: error: process 1 of 2 failed (signal SIGKILL)" in err and f"--resume {out}" in err
    assert "Traceback" not in err, err[-3000:]  # a survivor's backend trace goes to process<rank>-error.log
    epoch = runs.load_checkpoint(out / runs.CHECKPOINT)["counters"]["epoch"]  # intact
    assert 1 <= epoch < 60
    done = subprocess.run(
        [sys.executable, "-m", "pyrossl", "train", "--resume", str(out), "--quiet"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["epoch"] for r in runs.read_metrics(out)] == list(range(1, 61))


def test_a_two_process_run_killed_and_resumed_on_two_processes_ends_bit_for_bit_as_an_uninterrupted_one(tmp_path):
    """Every process's random state is in the checkpoint: rank 1 killed mid-run, the job resumed on two
    processes, and the final parameters equal those of an uninterrupted two-process run."""

    def pyrossl(*args):
        return subprocess.run(
            [sys.executable, "-m", "pyrossl", "train", *map(str, args)],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )

    proc, recipe, out = _job_past_its_first_checkpoint(tmp_path, epochs=4, batch_size=16, seed=3)
    time.sleep(0.2)  # into the next epoch
    victims = [pid for pid in _children(proc.pid) if _rank_of(pid) == 1]
    assert proc.poll() is None and victims, "the run ended before a process could be killed"
    os.kill(victims[0], signal.SIGKILL)
    proc.communicate(timeout=90)
    assert proc.returncode == 1
    assert 1 <= runs.load_checkpoint(out / runs.CHECKPOINT)["counters"]["epoch"] < 4
    assert pyrossl(recipe, "--out", tmp_path / "whole", "--nproc", 2).returncode == 0
    done = pyrossl("--resume", out, "--nproc", 2)
    assert done.returncode == 0, done.stderr[-2000:]
    whole, resumed = (runs.load_checkpoint(d / runs.CHECKPOINT) for d in (tmp_path / "whole", out))
    assert len(resumed["rng_ranks"]) == 2
    for key in whole["model"]:
        assert torch.equal(whole["model"][key], resumed["model"][key]), key
    assert [r["loss"] for r in runs.read_metrics(out)] == [r["loss"] for r in runs.read_metrics(tmp_path / "whole")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_every_process_in_one_line(tmp_path, signum):
    proc, _, out = _job_past_its_first_checkpoint(tmp_path, epochs=200, batch_size=32)
    ranks = _children(proc.pid)
    assert proc.poll() is None and ranks
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"pyrossl: interrupted by {signum.name}; every process was stopped and the last "
        f"checkpoint is intact: resume with pyrossl train --resume {out} --nproc 2"
    )
    assert not [
        pid
        for pid in ranks
        if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    ]
    runs.load_checkpoint(out / runs.CHECKPOINT)


def test_two_machines_simulated_on_one_host_complete_a_recipe(tmp_path):
    port = _free_port()
    out = tmp_path / "run"
    recipe = ROOT / "runs" / "vae-digits.toml"
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "pyrossl-test",
                "-m",
                "pyrossl",
                "train",
                str(recipe),
                "--set",
                "train.epochs=2",
                "--out",
                str(out),
                "--quiet",
            ],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    summary = runs.read_summary(out)
    assert summary["processes"] == 2 and summary["epochs"] == 2
    printed = results[0][0] + results[1][0]
    assert printed.count("run directory:") == 1  # one summary per job


def test_nproc_bad_input_is_one_line_before_any_process_starts(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyrossl",
            "train",
            str(ROOT / "runs" / "vae-digits.toml"),
            "--nproc",
            "2",
            "--set",
            "train.batch_size=0",
            "--out",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip() == "pyrossl: error: train.batch_size must be at least 1, not 0"
    assert not (tmp_path / "run").exists()
