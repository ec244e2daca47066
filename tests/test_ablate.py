import csv
from pathlib import Path

import pytest
import torch

from pyrossl import cli
from pyrossl.ablate import ablate, parse_vary, variants
from pyrossl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "runs/m2-digits.toml")
TINY = ["train.epochs=2", "options.hidden=[32]", "options.z_dim=4", "train.eval_every=1"]


def test_parse_vary_keeps_lists_whole():
    assert parse_vary("options.aux_weight=1,5") == ("options.aux_weight", ["1", "5"])
    assert parse_vary("options.hidden=[256],[500, 500]") == ("options.hidden", ["[256]", "[500, 500]"])
    for bad in ("options.aux_weight", "=1,2", "options.aux_weight=1,,2"):
        with pytest.raises(ConfigError):
            parse_vary(bad)


def test_variants_are_every_combination():
    vs = variants(["enum", "gumbel"], [("options.aux_weight", ["1", "5"])])
    assert [v.label for v in vs] == [
        "guide=enum,options.aux_weight=1",
        "guide=enum,options.aux_weight=5",
        "guide=gumbel,options.aux_weight=1",
        "guide=gumbel,options.aux_weight=5",
    ]
    assert vs[0].overrides == ["guide=enum", "options.aux_weight=1"]
    assert len({v.slug for v in vs}) == 4 and all("/" not in v.slug for v in vs)


def test_ablation_over_two_guides_and_two_seeds_writes_its_three_files(tmp_path):
    result = ablate(RECIPE, tmp_path, guides=["enum", "gumbel"], seeds=[0, 1], overrides=TINY)
    rows = list(csv.DictReader(result["csv"].open()))
    assert [(r["variant"], r["seed"]) for r in rows] == [
        ("guide=enum", "0"),
        ("guide=enum", "1"),
        ("guide=gumbel", "0"),
        ("guide=gumbel", "1"),
    ]
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in rows)
    assert rows[0]["test_accuracy"] != rows[1]["test_accuracy"] or rows[0]["seconds"] != rows[1]["seconds"]
    table = result["markdown"].read_text()
    assert "| guide=enum | 2 |" in table and "| guide=gumbel | 2 |" in table and "±" in table
    assert result["figure"].stat().st_size > 5000
    # a second call reads the finished runs instead of training them again
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/checkpoint.pt")}
    again = ablate(RECIPE, tmp_path, guides=["enum", "gumbel"], seeds=[0, 1], overrides=TINY)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/checkpoint.pt")} == mtimes
    assert again["rows"] == result["rows"]


def test_ablation_over_a_config_key_from_the_cli(tmp_path, capsys):
    args = ["ablate", RECIPE, "--vary", "options.aux_weight=0,10", "--seeds", "0", "--out", str(tmp_path)]
    assert cli.main(args + sum((["--set", s] for s in TINY), [])) == 0
    out = capsys.readouterr().out
    assert "options.aux_weight=0" in out and "options.aux_weight=10" in out
    assert {p.name for p in tmp_path.iterdir()} >= {"ablation.csv", "ablation.md", "ablation.png"}


def test_ablation_over_guides_and_z_guides_from_the_cli(tmp_path, capsys):
    args = [
        "ablate",
        RECIPE,
        "--guides",
        "enum,gumbel",
        "--z-guides",
        "diag-normal,flow",
        "--seeds",
        "0",
        "--out",
        str(tmp_path),
        "--set",
        "train.epochs=1",
    ]
    assert cli.main(args + sum((["--set", s] for s in TINY[1:]), [])) == 0
    rows = list(csv.DictReader((tmp_path / "ablation.csv").open()))
    assert [r["variant"] for r in rows] == [
        "guide=enum,z_guide=diag-normal",
        "guide=enum,z_guide=flow",
        "guide=gumbel,z_guide=diag-normal",
        "guide=gumbel,z_guide=flow",
    ]
    configs = [(tmp_path / r["run"] / "config.toml").read_text() for r in rows]
    assert ['z_guide = "flow"' in c for c in configs] == [False, True, False, True]


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "--guides, --z-guides or --vary"),
        (["--z-guides", "flw"], "z_guide 'flw' does not fit model 'm2' (did you mean 'flow'?)"),
        (["--z-guides", "flow", "--vary", "z_guide=diag-normal"], "each key may be varied once"),
        (["--guides", "enum", "--seeds", "a"], "--seeds"),
        (["--guides", "nope"], "guide"),
        (["--vary", "options.no_such_key=1,2"], "no_such_key"),
        (["--guides", "enum", "--vary", "guide=gumbel"], "varied once"),
        (["--vary", "options.act=a/b,a_b"], "share a run folder"),
    ],
)
def test_bad_ablations_fail_before_training(tmp_path, capsys, args, message):
    assert cli.main(["ablate", RECIPE, "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["../../escaped", "/etc/passwd", "..", "a\\..\\b", "x/../../y"])
def test_a_variant_folder_never_leaves_the_ablation_folder(tmp_path, value):
    from pyrossl import runs

    (v,) = variants([], [("data.path", [value])])
    run_dir = runs.child(tmp_path, f"{v.slug}-seed0")
    assert run_dir.resolve().parent == tmp_path.resolve()


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs"])
def test_child_refuses_names_that_are_not_one_entry(tmp_path, name):
    from pyrossl import runs
    from pyrossl.errors import PyrosslError

    with pytest.raises(PyrosslError, match="plain file or folder name"):
        runs.child(tmp_path, name)


def test_an_ablation_compares_what_the_guides_approximate_and_one_seed_shows_no_spread(tmp_path):
    result = ablate(RECIPE, tmp_path, guides=["enum", "gumbel"], seeds=[0], overrides=TINY, iwae=20)
    rows = list(csv.DictReader(result["csv"].open()))
    for r in rows:
        elbo, iwae, gap = float(r["test_guide_elbo"]), float(r["test_log_likelihood"]), float(r["test_iwae_gap"])
        assert elbo < 0 and gap == pytest.approx(iwae - elbo, abs=1e-6) and gap > -0.5  # IWAE(20) above the ELBO
        assert r["iwae_samples"] == "20"
    assert len({r["test_guide_elbo"] for r in rows}) == 2  # each guide approximates the posterior its own way
    table = result["markdown"].read_text()
    assert "test_guide_elbo" in table and "test_iwae_gap" in table and "±" not in table
    off = ablate(RECIPE, tmp_path / "off", guides=["enum"], seeds=[0], overrides=TINY, iwae=0)
    assert "test_iwae_gap" not in off["rows"][0]
    with pytest.raises(ConfigError, match="--iwae"):
        ablate(RECIPE, tmp_path / "bad", guides=["enum"], iwae=-1)


def test_an_ablation_of_an_entry_with_a_validation_elbo_draws_its_curve(tmp_path):
    result = ablate(
        RECIPE,
        tmp_path,
        z_guides=["diag-normal", "flow"],
        seeds=[0],
        iwae=5,
        overrides=[
            "model=vae",
            "guide=amortised",
            "options={}",
            "options.z_dim=2",
            "train.epochs=2",
            "data.labels_per_class=0",
        ],
    )
    assert result["elbo_figure"].stat().st_size > 5000


# --- cells in parallel, and on a cluster -------------------------------------------------------------------
CELLS = [*TINY, "threads=1", "train.figures=false"]  # one thread: what each of two jobs gets on two cores


def _numbers(result):
    """The ablation's rows without the wall-clock seconds."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result["rows"]]


def test_cells_in_two_processes_end_as_the_serial_ones_and_a_stopped_cell_resumes(tmp_path):
    import shutil

    from pyrossl import runs
    from pyrossl.config import load_config
    from pyrossl.train import train

    serial = ablate(RECIPE, tmp_path / "serial", guides=["enum", "gumbel"], overrides=CELLS, iwae=5)
    # a cell stopped after its first epoch (as a killed ablation leaves it), the other never started
    stopped = tmp_path / "parallel" / "guide-enum-seed0"
    config = load_config(RECIPE, [*CELLS, "train.epochs=1", "train.iwae_samples=5", "train.progress=false"])
    train(config, stopped)
    parallel = ablate(RECIPE, tmp_path / "parallel", guides=["enum", "gumbel"], overrides=CELLS, iwae=5, jobs=2)
    assert _numbers(parallel) == _numbers(serial)
    assert [r["extended_from_epochs"] for r in runs.read_metrics(stopped) if "extended_from_epochs" in r] == [1]
    for cell in ("guide-enum-seed0", "guide-gumbel-seed0"):
        a, b = (runs.load_checkpoint(tmp_path / f / cell / runs.CHECKPOINT) for f in ("serial", "parallel"))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # run again: every cell has finished, nothing trains
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "parallel").rglob("checkpoint.pt")}
    ablate(RECIPE, tmp_path / "parallel", guides=["enum", "gumbel"], overrides=CELLS, iwae=5, jobs=2)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "parallel").rglob("checkpoint.pt")} == before
    # a cell that fails is one line naming it
    shutil.rmtree(tmp_path / "parallel" / "guide-gumbel-seed0")
    with pytest.raises(ConfigError, match="ablation cell guide-enum-seed0: .*differs in train.lr"):
        ablate(RECIPE, tmp_path / "parallel", guides=["enum", "gumbel"], overrides=[*CELLS, "train.lr=0.5"], jobs=2)


def test_the_cells_commands_trained_one_by_one_are_collected_into_the_same_table(tmp_path, capsys):
    import shlex

    args = ["ablate", RECIPE, "--guides", "enum,gumbel", "--iwae", "5", *[a for s in CELLS for a in ("--set", s)]]
    assert cli.main([*args, "--out", str(tmp_path / "cluster"), "--collect"]) == 2
    assert "--collect: 2 of 2 cells have not finished (guide-enum-seed0, guide-gumbel-seed0)" in capsys.readouterr().err
    assert cli.main([*args, "--out", str(tmp_path / "cluster"), "--commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("pyrossl train ") for line in lines)
    for line in lines:  # what each task of a job array runs
        assert cli.main(shlex.split(line)[1:] + ["--quiet"]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--out", str(tmp_path / "cluster"), "--collect"]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "serial")]) == 0
    tables = [list(csv.DictReader((tmp_path / f / "ablation.csv").open())) for f in ("cluster", "serial")]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in tables[0]] == [
        {k: v for k, v in row.items() if k != "seconds"} for row in tables[1]
    ]
    # a cell trained with another config is not collected
    assert cli.main([*args, "--set", "train.lr=0.5", "--out", str(tmp_path / "cluster"), "--collect"]) == 2
    assert "was trained with another config (it differs in train.lr)" in capsys.readouterr().err
    assert cli.main([*args, "--jobs", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--jobs takes a number of processes, at least 1, not 0" in capsys.readouterr().err
