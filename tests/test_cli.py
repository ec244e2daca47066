"""The CLI: success paths, and one line with exit code 2 for every bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common import WritesAFile
from pyrossl.cli import main

RECIPE = """
model = "vae"
[data]
name = "digits"
labels_per_class = 0
[train]
epochs = 1
batch_size = 256
progress = false
[options]
z_dim = 2
hidden = [16]
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE)
    return path


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_eval_and_resume(tmp_path, recipe, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(["train", recipe, "--out", out_dir, "--set", "train.epochs=2", "--seed", "1"], capsys)
    assert code == 0, err
    assert "| test_elbo |" in out and f"run directory: {out_dir}" in out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["seed"] == 1 and summary["epochs"] == 2
    code, out, err = run_cli(["eval", out_dir, "--iwae", "3"], capsys)
    assert code == 0, err
    assert {"test_elbo", "test_log_likelihood"} <= set(json.loads(out))
    code, out, err = run_cli(
        ["train", "--resume", out_dir, "--quiet", "--threads", "1"], capsys
    )  # finished: re-summarises
    assert code == 0, err
    code, _, err = run_cli(["train", "--resume", out_dir, "--set", "train.lr=0.5"], capsys)
    assert code == 2 and "differs in train.lr" in err


def test_train_tunes_the_allocator_of_its_own_process(tmp_path, recipe, capsys, monkeypatch):
    import pyrossl.train

    calls = []
    monkeypatch.setattr(pyrossl.train, "tune_allocator", lambda: calls.append(1) or True)
    code, _, err = run_cli(["train", recipe, "--out", tmp_path / "run", "--set", "train.epochs=1", "--quiet"], capsys)
    assert code == 0 and calls == [1], err


def test_eval_of_a_model_without_a_likelihood(tmp_path, recipe, capsys):
    out_dir = tmp_path / "clf"
    args = [
        "train",
        recipe,
        "--out",
        out_dir,
        "--set",
        "model=classifier",
        "--set",
        "options={}",
        "--set",
        "data.labels_per_class=5",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    code, _, err = run_cli(["eval", out_dir, "--iwae", "5"], capsys)
    assert code == 2 and "has no likelihood estimate" in err
    code, _, err = run_cli(["eval", out_dir, "--iwae", "-1"], capsys)
    assert code == 2 and "--iwae must be" in err


def test_list_names_models_guides_and_datasets(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    for word in (
        "vae",
        "amortised*",
        "z-guides: diag-normal*, lowrank-normal, flow",
        "digits",
        "mnist5k",
        "fashion-mnist",
        "npz",
    ):
        assert word in out


def test_data_info(capsys):
    code, out, _ = run_cli(["data", "info", "digits"], capsys)
    assert code == 0 and "1797 images of shape (1, 8, 8)" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "{recipe}", "--set", "train.epoch=3"], "did you mean 'train.epochs'"),
        (["train", "{recipe}", "--set", "model=vea"], "unknown model 'vea' (did you mean 'vae'?)"),
        (["train", "{recipe}", "--set", "guide=diag-norm"], "guide 'diag-norm' does not fit model 'vae'"),
        (["train", "{recipe}", "--set", "guide=amortsed"], "(did you mean 'amortised'?)"),
        (["train", "{recipe}", "--set", "guide=flow"], 'chosen with z_guide = "flow"'),
        (
            ["train", "{recipe}", "--set", "z_guide=flw"],
            "z_guide 'flw' does not fit model 'vae' (did you mean 'flow'?)",
        ),
        (
            ["train", "{recipe}", "--set", "model=gae", "--set", "guide=point", "--set", "z_guide=flow"],
            "it has no Gaussian code (models with one: vae, m2, m1m2, adgm, sdgm, gmm-vae, serket-vae-gmm, ccvae)",
        ),
        (
            ["train", "{recipe}", "--set", "model=m2", "--set", "guide=enum", "--set", "train.objective=iwae"],
            "train.objective 'iwae' fits m2 only with guide dirichlet or logistic-normal-latent, not 'enum'",
        ),
        (
            ["train", "{recipe}", "--set", "model=gmm-vae", "--set", "train.objective=iwae"],
            "train.objective 'iwae' does not fit model 'gmm-vae'",
        ),
        (
            ["train", "{recipe}", "--set", "model=ccvae", "--set", "options={{}}", "--set", "train.objective=iwae"],
            "train.objective 'iwae' does not fit model 'ccvae'",
        ),
        (["train", "{recipe}", "--set", "train.objective=elbbo"], "train.objective must be one of elbo, iwae"),
        (["train", "{recipe}", "--set", "train.particles=0"], "train.particles must be at least 1"),
        (["train", "{recipe}", "--set", "options.flows=0"], "options.flows must be at least 1"),
        (["train", "{recipe}", "--set", "options.z_rank=0"], "options.z_rank must be at least 1"),
        (["train", "{recipe}", "--set", "data.name=fashion-mnst"], "did you mean 'fashion-mnist'"),
        (["train", "{recipe}", "--set", "options.z_dimm=3"], "did you mean 'options.z_dim'"),
        (["train", "{recipe}", "--set", "train.batch_size=0"], "batch_size must be at least 1"),
        (["train", "{bad_toml}"], "line 2"),
        (["train", "{tmp}/missing.toml"], "does not exist"),
        (["train", "{recipe}", "--set", "data.name=mnist", "--set", "data.data_dir={tmp}/nothing"], "nothing"),
        (["train", "{recipe}", "--set", "data.name=fashion-mnist", "--data-dir", "{tmp}/elsewhere"], "elsewhere"),
        (["train", "--resume", "{tmp}"], "not a run directory"),
        (["train"], "needs a recipe"),
        (["eval", "{tmp}"], "not a run directory"),
        (["train", "{recipe}", "--set", "options.net=cnn"], "options.net must be one of mlp, conv"),
        (["train", "{recipe}", "--set", "options.hidden=[]"], "options.hidden must list at least one layer"),
        (["train", "{recipe}", "--set", "options.z_dim=0"], "z_dim must be at least 1"),
        (["train", "{recipe}", "--threads", "-1"], "threads must be at least 1"),
        (["train", "{recipe}", "--set", "train.iwae_samples=-1"], "iwae_samples must be 0"),
        (
            ["train", "{recipe}", "--set", "data.validation=1.5"],
            "data.validation = 1.5: a count of examples must be whole",
        ),
        (["train", "{recipe}", "--set", "data.test=-0.1"], "data.test must be a fraction in [0, 1) or a whole count"),
        (
            ["train", "{recipe}", "--set", "data.validation=1"],
            "data.validation leaves 1 validation example: at least 2",
        ),
        (["train", "{recipe}", "--set", "train.lr=nan"], "'train.lr' must be a finite number, not nan"),
        (["train", "{recipe}", "--set", "train.epochs=1e30"], "'train.epochs' = 1e+30 is out of range"),
        (["train", "{recipe}", "--set", "seed=-1"], "seed must be in 0 .. 2**32 - 1"),
        (
            ["train", "{recipe}", "--set", "train.precision=fp16"],
            "train.precision must be one of fp32, bf16, auto, not 'fp16'",
        ),
        (["train", "{recipe}", "--set", "data.limit_per_class=0"], "data.limit_per_class must be at least 1"),
        (["train", "{recipe}", "--set", "train.figures=maybe"], "'train.figures' must be true or false, not 'maybe'"),
        (["train", "{recipe}", "--set", "train.lr_schedule=linear"], "unknown train.lr_schedule 'linear'"),
        (["train", "{recipe}", "--set", "train.patience=0"], "train.patience must be at least 1"),
        (["train", "{recipe}", "--set", 'train.loggers=["wandb"]'], "unknown tracker 'wandb' in train.loggers"),
        (
            ["train", "{recipe}", "--set", "train.kl_warmup_epochs=-1"],
            "train.kl_warmup_epochs must be 0 (none) or more",
        ),
        (
            ["train", "{recipe}", "--set", "train.patience=3", "--set", "data.validation=0"],
            "train.patience watches the selection metric on the validation part, and the split has none",
        ),
        (
            ["train", "{recipe}", "--set", "model=gae", "--set", "options={{}}", "--set", "data.labels_per_class=1"],
            "every class needs at least 2 labelled examples",
        ),
        (
            [
                "train",
                "{recipe}",
                "--set",
                "model=gmm-vae",
                "--set",
                "options={{clusters = 40}}",
                "--set",
                "data.limit_per_class=3",
            ],
            "options.clusters = 40 needs at least 40 training examples",
        ),
        (["train", "{recipe}", "--out", "/proc/no/such/place"], "cannot write into /proc/no/such/place"),
        (["train", "{recipe}", "--out", "{recipe}"], "a file of that name exists"),
        (
            ["ablate", "{recipe}", "--guides", "amortised", "--out", "/proc/no/such/place"],
            "cannot write into /proc/no/such/place",
        ),
        (["frobnicate"], "invalid choice"),
        (["data", "download", "cifar"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run directories land in tmp_path/outputs
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "vae"\n[train\n')
    args = [a.format(recipe=recipe, bad_toml=bad, tmp=tmp_path) for a in args]
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("pyrossl: error: "), err
    assert message in err
    assert "Traceback" not in err


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path, recipe, capsys, monkeypatch):
    monkeypatch.setenv("PYROSSL_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("PYROSSL_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(["train", recipe, "--set", "data.name=mnist", "--out", tmp_path / "r"], capsys)
    assert code == 2
    assert "pyrossl data download mnist" in err and str(tmp_path / "cache") in err


def test_module_entry_point_exit_code():
    result = subprocess.run([sys.executable, "-m", "pyrossl", "train", "--set"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("command", ["eval", "report", "resume"])
def test_a_run_whose_checkpoint_would_run_code_is_refused(tmp_path, recipe, capsys, command):
    import torch

    from pyrossl import runs

    run = tmp_path / "run"
    assert run_cli(["train", recipe, "--out", run], capsys)[0] == 0
    marker = tmp_path / "pwned"
    for name in (runs.CHECKPOINT, runs.BEST):
        torch.save({"model": WritesAFile(str(marker)), "epoch": 1}, run / name)
    args = ["train", "--resume", run] if command == "resume" else [command, run]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "not a safe pyrossl checkpoint" in err and err.count("\n") == 1
    assert not marker.exists()


def test_an_image_size_the_convolutional_network_cannot_take(tmp_path, recipe, capsys):
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((40, 10, 10)), y=np.arange(40) % 2)
    code, _, err = run_cli(
        [
            "train",
            recipe,
            "--set",
            "data.name=npz",
            "--set",
            f"data.path={tmp_path / 'd.npz'!s}",
            "--set",
            "options.net=conv",
            "--out",
            tmp_path / "r",
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1
    assert "needs images of at least 8x8 with height and width divisible by 4, not 1x10x10" in err


def test_an_unwritable_output_folder_fails_before_any_data_is_loaded(tmp_path, recipe, capsys, monkeypatch):
    from pyrossl import runs

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the output folder was checked")

    monkeypatch.setattr(runs, "load_dataset_for", no_data)
    places = [Path("/proc/nowhere"), recipe]  # a folder that cannot be made, a file where the folder should be
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "locked").mkdir(mode=0o500)
        places.append(tmp_path / "locked")
    for place in places:
        for command in (
            ["train", recipe, "--out", place / "run"],
            ["ablate", recipe, "--guides", "amortised", "--out", place / "ab"],
        ):
            code, out, err = run_cli(command, capsys)
            assert code == 2 and err.count("\n") == 1 and "cannot write into" in err and str(place) in err, err


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("summary.json", '{"model": "vae",\n  "epochs": }', "summary.json: line 2, column 13: not JSON"),
        ("summary.json", "[1, 2]", "summary.json: not a run summary"),
        ("summary.json", '{"model": "vae"}', "summary.json: 'guide' is missing or not a str"),
        ("config.toml", 'model = "vae"\n[train]\nepochs = "three"\n', "config.toml: 'train.epochs' must be an integer"),
        ("config.toml", 'model = "vae"\n[train\n', "config.toml: TOML syntax error"),
        (
            "metrics.jsonl",
            '{"epoch": 1, "loss": 1.0}\nnot json\n{"epoch": 2, "loss": 1.0}\n',
            "metrics.jsonl: line 2: not JSON",
        ),
        ("metrics.jsonl", '{"epoch": 1, "loss": "low"}\n', "metrics.jsonl: line 1: 'loss' is not a number"),
        ("metrics.jsonl", '{"epoch": 2}\n{"epoch": 1}\n', "metrics.jsonl: the epochs are not increasing"),
        ("best.pt", "", "best.pt is not a readable checkpoint"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "report"])
def test_a_damaged_run_file_is_one_line_naming_it(name, content, message, command, tmp_path, recipe, capsys):
    assert run_cli(["train", recipe, "--out", tmp_path / "run"], capsys)[0] == 0
    (tmp_path / "run" / name).write_text(content)
    code, out, err = run_cli([command, tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_torn_last_metrics_line_is_tolerated(tmp_path, recipe, capsys):
    """A kill while an epoch's line was appended leaves it cut short: that epoch has no checkpoint, and is dropped."""
    assert run_cli(["train", recipe, "--out", tmp_path / "run"], capsys)[0] == 0
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"epoch": 3, "loss": 1.2')
    assert run_cli(["eval", tmp_path / "run"], capsys)[0] == 0
    assert run_cli(["report", tmp_path / "run"], capsys)[0] == 0


def test_a_run_folder_that_vanishes_mid_training_is_one_line(tmp_path, recipe, capsys, monkeypatch):
    import shutil

    from pyrossl import runs

    append = runs.append_metrics

    def vanish_then_append(run_dir, record):
        shutil.rmtree(run_dir)  # someone deletes the run while it trains
        append(run_dir, record)

    monkeypatch.setattr(runs, "append_metrics", vanish_then_append)
    code, out, err = run_cli(["train", recipe, "--out", tmp_path / "run"], capsys)
    assert code == 2 and err.count("\n") == 1 and str(tmp_path / "run") in err and "Traceback" not in err, err


def test_input_beyond_any_limit_is_one_short_line_before_anything_is_written(tmp_path, recipe, capsys):
    """Nesting deeper than the parser goes, integers of thousands of digits, a value of megabytes,
    an IWAE k no memory holds, a data path that is a FIFO: each one line of bounded length, exit 2."""
    huge = tmp_path / "huge.toml"
    huge.write_text(recipe.read_text().replace('name = "digits"', 'name = "' + "d" * 5_000_000 + '"'))
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    cases = [
        ([recipe, "--set", "options.hidden=" + "[" * 3000 + "1" + "]" * 3000], "nested too deeply"),
        ([recipe, "--set", "options.hidden=" + "[" * 40 + "1" + "]" * 40], "nested too deeply"),
        ([recipe, "--set", "train.epochs=" + "9" * 5000], "digits"),
        ([huge], "unknown dataset"),
        ([recipe, "--set", "train.iwae_samples=100000000"], "train.iwae_samples = 100000000 needs about"),
        ([recipe, "--set", "data.name='npz'", "--set", f"data.path='{fifo}'"], "not a regular file"),
    ]
    for args, message in cases:
        out = tmp_path / "run"
        code, _, err = run_cli(["train", *args, "--out", out], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err and len(err) < 1600, err[:2000]
        assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()
        shutil.rmtree(out, ignore_errors=True)


def test_a_recipe_with_a_byte_order_mark_and_a_relative_data_dir(tmp_path, recipe, capsys, monkeypatch):
    """An editor's BOM is no syntax error; a relative data_dir is recorded as an absolute path, so the
    run reads the same files from any folder."""
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + recipe.read_bytes())
    (tmp_path / "files").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        ["train", bom, "--out", tmp_path / "run", "--set", "train.epochs=1", "--data-dir", "files"], capsys
    )
    assert code == 0, err
    assert f'data_dir = "{tmp_path / "files"}"' in (tmp_path / "run" / "config.toml").read_text()


def test_eval_refuses_an_iwae_k_no_memory_holds(tmp_path, recipe, capsys):
    assert run_cli(["train", recipe, "--out", tmp_path / "run"], capsys)[0] == 0
    code, _, err = run_cli(["eval", tmp_path / "run", "--iwae", "100000000"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--iwae = 100000000 needs about" in err, err


def test_the_cause_of_a_failed_job_is_the_process_found_failed_first():
    """torchrun's failures: the process killed first, then the one it stopped, often in the same second."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from pyrossl.cli import first_cause

    def failure(rank, exitcode, second):
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file="/nonexistent")
        f.timestamp = second
        return f

    killed_then_stopped = {1: failure(1, -9, 50), 0: failure(0, -15, 50)}  # capture order, one second
    assert first_cause(killed_then_stopped)[0] == 1
    assert first_cause({0: failure(0, -15, 51), 1: failure(1, -9, 50)})[0] == 1  # an earlier second wins
    assert first_cause({0: failure(0, 1, 50), 1: failure(1, -9, 50)})[0] == 1  # a survivor's exit code is an effect
    rank, f = first_cause({1: failure(1, 2, 50), 0: failure(0, 1, 50)})
    assert (rank, f.exitcode) == (1, 2)  # no signal: the first captured
