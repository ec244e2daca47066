"""The benchmark scripts still run end to end (tiny settings; their numbers are not checked here)."""

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from pyrossl import runs
from pyrossl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_m2_benchmark_runs_and_writes_json(tmp_path, capsys):
    bench = _load("m2")
    out = tmp_path / "m2.json"
    result = bench.main(
        [
            "--recipe",
            str(ROOT / "runs" / "m2-digits.toml"),
            "--guides",
            "enum,gumbel",
            "--seeds",
            "0",
            "--set",
            "train.epochs=2",
            "--set",
            "options.hidden=[32]",
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(out),
            "--timing-steps",
            "2",
            "--baseline-steps",
            "20",
        ]
    )
    assert json.loads(out.read_text())["rows"][0]["method"] == "m2 / enum"
    assert len(result["rows"]) == 3 and result["timing"]["enum_over_plain"] > 0
    assert result["timing"]["enum_over_plain_bf16"] > 0 and result["timing"]["ms_per_step_bf16"]["plain"] > 0
    printed = capsys.readouterr().out
    assert "| m2 / gumbel |" in printed and "enum / plain" in printed
    (check,) = result["rows"][0]["generative_agreement"]  # enum only, by default
    assert check["images"] > 0 and all(0 <= check[k] <= 1 for k in ("q_accuracy", "generative_accuracy", "agreement"))
    assert "generative_agreement" not in result["rows"][1] and "generative p(y|x) accuracy" in printed


def test_plain_enumerated_loss_matches_the_svi_loss():
    """The hand-written loss is the same objective: equal in expectation to the SVI enum loss."""
    import torch
    from pyro.infer import TraceEnum_ELBO, TraceMeanField_ELBO

    from pyrossl.models.m2 import M2, M2Options

    bench = _load("m2")
    torch.manual_seed(0)
    entry = M2({"image_shape": (1, 4, 4), "num_classes": 3}, M2Options(z_dim=2, hidden=[8], aux_weight=0.0), "enum")
    x, xl, yl = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4), torch.tensor([0, 2])
    with torch.no_grad():
        plain = torch.stack([bench.plain_enumerated_loss(entry, x, xl, yl) for _ in range(4000)]).mean()
        unl = TraceEnum_ELBO(max_plate_nesting=1, num_particles=20000, vectorize_particles=True)
        lab = TraceMeanField_ELBO(num_particles=20000, vectorize_particles=True)
        svi = unl.loss(entry.model, entry.guide, x) / 2 + lab.loss(entry.model, entry.guide, xl, entry.one_hot(yl)) / 2
    assert plain.item() == __import__("pytest").approx(svi, rel=3e-3)


def test_gae_benchmark_runs_and_writes_json_and_the_contrast_figure(tmp_path, capsys):
    bench = _load("gae")
    recipe = tmp_path / "gae-digits.toml"
    recipe.write_text(
        'model = "gae"\n[data]\nname = "digits"\nvalidation = 0.1\ntest = 0.2\n'
        "[train]\nepochs = 2\nbatch_size = 64\n[options]\nz_dim = 4\nhidden = [32]\ncomponents = 2\n"
    )
    out = tmp_path / "gae.json"
    result = bench.main(
        [
            "--recipes",
            str(recipe),
            "--seeds",
            "0,1",
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(out),
            "--vae-epochs",
            "1",
            "--figure",
            str(tmp_path / "interp.png"),
        ]
    )
    row = json.loads(out.read_text())["rows"][0]
    assert row["dataset"] == "digits" and len(row["per_seed"]) == 2 and 0 <= row["test_accuracy"] <= 1
    assert "novelty_rate_other" not in row  # digits (8x8) has no other dataset of its shape
    assert (tmp_path / "interp.png").stat().st_size > 0 and result["figure"]
    assert "| digits (2 seeds) |" in capsys.readouterr().out


def test_gmm_vae_benchmark_runs_every_method_and_writes_json(tmp_path, capsys):
    bench = _load("gmm_vae")
    out = tmp_path / "gmm.json"
    tiny = [
        "train.epochs=4",
        "train.eval_every=2",
        "train.batch_size=100",
        "options.hidden=[16]",
        "options.z_dim=3",
        "options.n_init=1",
    ]
    result = bench.main(
        [
            "--dataset",
            "digits",
            "--per-class",
            "30",
            "--seeds",
            "0,1",
            "--out",
            str(out),
            "--runs",
            str(tmp_path / "runs"),
            "--set-serket",
            "options.epochs_per_round=2",
            "--set-gmm-vae",
            "options.warmup_epochs=2",
            *[arg for key in tiny for arg in ("--set", key)],
        ]
    )
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(bench.METHODS.split(",")) and len(result["rows"]) == 6
    assert all(r["points"] == 300 and 0 < r["cluster_accuracy"] <= 1 and r["seconds"] > 0 for r in rows.values())
    assert result["serket_over_plain"] > 0
    printed = capsys.readouterr().out
    assert "| gmm-pca18-pyro |" in printed and "| serket |" in printed and "plain PyTorch" in printed


def test_ccvae_benchmark_judges_interventions_and_walks_and_writes_json(tmp_path, capsys):
    bench = _load("ccvae")
    digits = tmp_path / "ccvae-digits.toml"
    digits.write_text(
        'model = "ccvae"\n[data]\nname = "digits"\nlabels_per_class = 10\nvalidation = 0.1\ntest = 0.2\n'
        "[train]\nepochs = 2\nbatch_size = 64\n[options]\nz_style = 2\nhidden = [32]\nk = 5\n"
    )
    shapes = tmp_path / "ccvae-shapes.toml"
    shapes.write_text(
        'model = "ccvae"\n[data]\nname = "shapes"\nnum_examples = 480\nvalidation = 40\n'
        '[train]\nepochs = 1\nbatch_size = 40\n[options]\nnet = "conv"\nz_style = 2\nhidden = [16]\nk = 5\n'
    )
    out = tmp_path / "ccvae.json"
    result = bench.main(
        [
            "--recipes",
            f"{digits},{shapes}",
            "--seeds",
            "0,1",
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(out),
            "--judge-limit",
            "300",
            "--test-limit",
            "50",
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["dataset"] for r in rows] == ["digits", "shapes"] and len(result["rows"]) == 2
    assert rows[0]["supervision"] == "partial" and rows[0]["labelled"] == 100 and rows[1]["supervision"] == "full"
    assert 0 <= rows[0]["intervention_accuracy"] <= 1 and len(rows[0]["per_seed"][0]["per_class"]) == 10
    assert "walk_own_change" not in rows[0] and 0 <= rows[1]["walk_other_change"] <= 1
    assert all(r["epoch_seconds"] > 0 and 0 <= r["baseline_accuracy"] <= 1 for r in rows)
    assert result["judges"]["shapes"]["kind"] == "conv" and result["judges"]["digits"]["kind"] == "logistic"
    printed = capsys.readouterr().out
    assert "| digits (100 labelled, 2 seeds) |" in printed and "judge for shapes: conv" in printed


def test_scaling_benchmark_times_one_and_two_processes(tmp_path, capsys):
    bench = _load("scaling")
    out = tmp_path / "scaling.json"
    result = bench.main(
        [
            "--recipe",
            str(ROOT / "runs" / "m2-digits.toml"),
            "--nprocs",
            "1,2",
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(out),
            "--set",
            "options.hidden=[32]",
            "--repeats",
            "2",
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    for r in rows:  # the median of the repeated epochs counts
        assert len(r["epoch_seconds_each"]) == 2 and r["epoch_seconds"] == statistics.median(r["epoch_seconds_each"])
        assert r["images_per_second"] == r["images"] / r["epoch_seconds"]
    assert [r["processes"] for r in rows] == [1, 2] and rows[0]["efficiency"] == 1.0
    assert all(r["images_per_second"] > 0 and r["steps"] == rows[0]["steps"] for r in rows)  # the same global batches
    assert result["recipe"] == "m2-digits.toml" and "| 2 | cpu | 1 |" in capsys.readouterr().out
    # the ceiling: two independent runs with half batches, each over the whole training set
    assert "ceiling_efficiency" not in rows[0] and rows[1]["independent_images_per_second"] > 0
    assert rows[1]["ceiling_efficiency"] == rows[1]["independent_images_per_second"] / (
        2 * rows[0]["images_per_second"]
    )
    assert sorted(p.name for p in (tmp_path / "runs" / "cpu-2-independent").iterdir()) == ["alone-0", "alone-1"]
    alone = runs.read_config(tmp_path / "runs" / "cpu-2-independent" / "alone-0")
    digits = runs.read_config(tmp_path / "runs" / "cpu-1")
    assert alone.train.batch_size == digits.train.batch_size // 2


def test_guides_benchmark_runs_every_z_guide_and_writes_json(tmp_path, capsys):
    bench = _load("guides")
    out = tmp_path / "guides.json"
    assert (
        bench.main(
            [
                "--part",
                "vae",
                "--seeds",
                "0",
                "--runs",
                str(tmp_path / "runs"),
                "--out",
                str(out),
                "--set",
                "train.epochs=1",
                "--set",
                "data.name=digits",
                "--set",
                "data.validation=0.1",
                "--set",
                "data.test=0.2",
                "--set",
                "options.hidden=[16]",
                "--set",
                "options.z_dim=2",
                "--set",
                "train.iwae_samples=3",
            ]
        )
        == 0
    )
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"diag-normal", "lowrank-normal", "flow", "targets"}
    assert saved["results"]["flow"]["test_log_likelihood"][0] < 0
    printed = capsys.readouterr().out
    assert "| flow |" in printed and "epoch ratio" in printed
    assert out.with_suffix(".png").stat().st_size > 5000
    # the M2 part lists every label guide with both z-guides and the classifier on the same labels
    labels = [label for label, _, _ in bench.PARTS["m2-mnist5k"]["variants"]]
    assert "enum / flow" in labels and "dirichlet / diag-normal" in labels and labels[-1].startswith("labels alone")


def test_guides_benchmark_gives_the_labels_alone_as_many_labelled_steps_as_m2(tmp_path):
    bench = _load("guides")
    out = tmp_path / "m2.json"
    small = ["train.epochs=2", "data.name=digits", "data.validation=0.1", "data.test=0.2", "options.hidden=[16]"]
    assert (
        bench.main(
            [
                "--part",
                "m2-mnist5k",
                "--seeds",
                "0",
                "--runs",
                str(tmp_path / "runs"),
                "--out",
                str(out),
                "--variants",
                "enum / diag-normal,labels alone (classifier)",
                *[a for s in small for a in ("--set", s)],
            ]
        )
        == 0
    )
    m2 = runs.read_config(tmp_path / "runs" / "m2-mnist5k" / "enum-diag-normal-seed0")
    split = runs.split_for(m2, runs.load_dataset_for(m2))
    steps_per_epoch = -(-len(split.unlabelled) // m2.train.batch_size)  # one labelled batch (all 100 labels) in each
    alone = tmp_path / "runs" / "m2-mnist5k" / "labels-alone-classifier-seed0"
    config = runs.read_config(alone)
    assert len(split.labelled) == config.train.labelled_batch_size == 100  # so one classifier step per its epoch
    assert config.train.epochs == 2 * steps_per_epoch and config.train.eval_every == steps_per_epoch
    evaluated = [r for r in runs.read_metrics(alone) if "val_accuracy" in r]
    assert [r["epoch"] for r in evaluated] == [steps_per_epoch, 2 * steps_per_epoch]
    saved = json.loads(out.read_text())["results"]["labels alone (classifier)"]["runs"][0]
    assert saved["best_epoch"] in (1, 2)  # counted in M2 epochs


def test_precision_benchmark_runs_both_precisions_side_by_side_and_writes_json(tmp_path, capsys):
    bench = _load("precision")
    out = tmp_path / "precision.json"
    settings = ["--set", "train.epochs=1", "--set", "options.hidden=[32]", "--set", "data.test=200"]
    report = bench.main(
        ["--workloads", "m2-enum-mnist5k", "--seeds", "0", *settings, "--runs", str(tmp_path / "r"), "--out", str(out)]
    )
    assert json.loads(out.read_text())["results"].keys() == {"m2-enum-mnist5k"}
    result = report["results"]["m2-enum-mnist5k"]
    assert [r["precision"] for r in result["fp32"]["runs"] + result["bf16"]["runs"]] == ["fp32", "bf16"]
    assert result["ratio"][0] > 0 and set(result["meets"]) == {"ratio", "test_accuracy"}
    assert report["machine"]["cpu"] and "| m2-enum-mnist5k |" in capsys.readouterr().out


def test_evaluation_benchmark_measures_the_share_of_each_evaluated_epoch(tmp_path, capsys):
    bench = _load("evaluation")
    out = tmp_path / "evaluation.json"
    settings = ["--set", "train.epochs=2", "--set", "options.hidden=[32]", "--set", "train.iwae_samples=0"]
    report = bench.main(["--workloads", "vae", *settings, "--runs", str(tmp_path / "r"), "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"].values()
    assert row == report["results"]["vae"] and row["epochs"] == row["evaluated_epochs"] == 2
    assert 0 < row["eval_fraction"] < 1 and row["loop_over_training"] >= 1
    assert "| vae | 2 (2) |" in capsys.readouterr().out


def test_semisupervised_benchmark_runs_every_method_and_the_baseline_and_writes_json(tmp_path, capsys):
    bench = _load("semisupervised")
    out = tmp_path / "semisupervised.json"
    result = bench.main(
        [
            "--datasets",
            "mnist5k-100",
            "--seeds",
            "0",
            "--set",
            "train.epochs=1",
            "--set",
            "data.limit_per_class=40",
            "--set",
            "data.validation=50",
            "--set",
            "data.test=100",
            "--set",
            "options.hidden=[16]",
            "--set",
            "m1m2:options.m1_hidden=[16]",
            "--set",
            "m1m2:options.m1_epochs=1",
            "--diagnose-images",
            "20",
            "--runs",
            str(tmp_path / "runs"),
            "--out",
            str(out),
        ]
    )
    methods = [r["method"] for r in json.loads(out.read_text())["rows"]]
    assert methods == ["m2", "m1m2", "adgm", "sdgm", "labels alone (classifier)"]
    baseline = result["rows"][-1]
    m2_steps = runs.read_summary(tmp_path / "runs" / "m2-mnist5k-100-seed0")["steps"]
    assert runs.read_summary(tmp_path / "runs" / "classifier-mnist5k-100-seed0")["steps"] == m2_steps
    assert all(0 <= a <= 1 for r in result["rows"] for a in r["best_validation"] + r["last_epoch"])
    assert "seconds_outside_epochs" in result["rows"][1] and baseline["epochs"] == m2_steps
    printed = capsys.readouterr().out
    assert "| mnist5k-100 | adgm |" in printed and "target 0.85 in both columns met by" in printed
    assert set(result["generative_agreement"]) == {f"mnist5k-100 {m}" for m in ("m2", "m1m2", "adgm", "sdgm")}
    # a second invocation reads the finished runs: nothing is trained again
    again = bench.main(
        ["--datasets", "mnist5k-100", "--seeds", "0", "--methods", "adgm", "--no-baseline"]
        + ["--runs", str(tmp_path / "runs"), "--out", str(out), "--diagnose-images", "0"]
        + ["--set", "train.epochs=1", "--set", "data.limit_per_class=40", "--set", "options.hidden=[16]"]
        + ["--set", "data.validation=50", "--set", "data.test=100"]
    )
    assert again["rows"][0]["best_validation"] == result["rows"][2]["best_validation"]
    assert "seconds_outside_epochs" not in again["rows"][0]


def test_no_benchmark_shadows_a_standard_module_and_each_runs_as_a_script():
    """``python benchmarks/NAME.py`` puts benchmarks/ first on sys.path: a script named like a standard
    module (ssl.py did) would be imported in its place by whatever imports that module."""
    import subprocess
    import sys

    scripts = sorted((ROOT / "benchmarks").glob("*.py"))
    assert scripts and not [p.name for p in scripts if p.stem in sys.stdlib_module_names]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "semisupervised.py"), "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--datasets" in done.stdout, done.stderr[-2000:]


def test_semisupervised_benchmark_names_a_run_folder_it_cannot_reuse_in_one_line(tmp_path):
    """A folder whose saved config the entry no longer reads (an option since removed) stops the
    benchmark with an error naming the folder, from the script as one line and exit code 2."""
    folder = tmp_path / "runs" / "m2-mnist5k-100-seed0"
    settings = ["--set", "train.epochs=1", "--set", "data.limit_per_class=40", "--set", "data.validation=50"]
    settings += ["--set", "data.test=100", "--set", "options.hidden=[8]"]
    argv = ["--datasets", "mnist5k-100", "--methods", "m2", "--seeds", "0", "--no-baseline", "--diagnose-images", "0"]
    argv += [*settings, "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out.json")]
    bench = _load("semisupervised")
    bench.main(argv)
    saved = folder / "config.toml"
    saved.write_text(saved.read_text().replace("[options]\n", "[options]\nretired_option = 1\n"))
    with pytest.raises(ConfigError, match=f"cannot reuse the run folder {folder}: .*retired_option"):
        bench.main(argv)
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "semisupervised.py"), *argv], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: cannot reuse the run folder")
