"""Plugins: guides and entries registered from outside the package, found again in fresh processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ROOT / "notebooks" / "plugins" / "m2_guides.py"  # the file the tutorial "Your own guide" shows
TINY = ["--set", "train.epochs=1", "--set", "options.hidden=[16]", "--set", "options.z_dim=2", "--quiet"]


def pyrossl(*args, cwd=None, env=None):
    """``pyrossl ARGS`` in a fresh process: (exit code, stdout, stderr)."""
    out = subprocess.run(
        [sys.executable, "-m", "pyrossl", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    return out.returncode, out.stdout, out.stderr


def one_line_error(code, stderr, *needles):
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_guide_from_a_file_trains_evaluates_reports_resumes_and_loads_in_fresh_processes(tmp_path):
    plugin = tmp_path / "guides.py"
    plugin.write_text(GUIDES.read_text())
    run = tmp_path / "run"
    code, out, err = pyrossl(
        "train",
        ROOT / "runs/m2-digits.toml",
        "--set",
        "guide=qzx",
        *TINY,
        "--plugin",
        "guides.py",
        "--out",
        run,
        cwd=tmp_path,
    )
    assert code == 0, err
    assert f'plugins = ["{plugin}"]' in (run / "config.toml").read_text()  # recorded by its absolute path
    code, out, err = pyrossl("eval", run)  # no --plugin: the run says where its guide comes from
    assert code == 0, err
    assert "test_accuracy" in json.loads(out)
    assert pyrossl("report", run)[0] == 0
    assert pyrossl("train", "--resume", run, "--quiet")[0] == 0
    code = f"import pyrossl; run = pyrossl.load_run(r'{run}'); print(type(run.model.guide).__name__)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.stdout.strip() == "QzxGuide", loaded.stderr
    plugin.rename(tmp_path / "elsewhere.py")
    for command in (["eval", run], ["report", run], ["train", "--resume", run]):
        one_line_error(*pyrossl(*command)[::2], "plugin file", "guides.py", "does not exist")


def test_ablate_compares_a_plugins_guides_with_the_zoos(tmp_path):
    code, out, err = pyrossl(
        "ablate",
        ROOT / "runs/m2-digits.toml",
        "--guides",
        "enum,qzx,smoothed-enum",
        *TINY[:-1],
        "--plugin",
        GUIDES,
        "--out",
        tmp_path / "ablation",
    )
    assert code == 0, err
    for variant in ("guide=enum", "guide=qzx", "guide=smoothed-enum"):
        assert variant in out
    assert f'"{GUIDES}"' in (tmp_path / "ablation" / "guide-qzx-seed0" / "config.toml").read_text()


def test_a_recipe_names_its_plugins(tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text(
        (ROOT / "runs/m2-digits.toml").read_text().replace('model = "m2"', f'plugins = ["{GUIDES}"]\nmodel = "m2"', 1)
    )
    code, out, err = pyrossl("train", recipe, "--set", "guide=smoothed-enum", *TINY, "--out", tmp_path / "run")
    assert code == 0, err


def test_a_guide_lacking_what_its_family_requires_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from torch import nn\nfrom pyrossl.guides.label import LABEL_GUIDES\n\n"
        "@LABEL_GUIDES.register('half')\nclass Half(nn.Module):\n    description = 'no classifier'\n\n"
        "    def forward(self, x, y=None):\n        pass\n"
    )
    code, _, err = pyrossl(
        "train", ROOT / "runs/m2-digits.toml", "--set", "guide=half", "--plugin", bad, "--out", tmp_path / "run"
    )
    one_line_error(code, err, "guide 'half'", "lacks", "classify", "z_moments", "make_elbo", "label_latent")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    one_line_error(*pyrossl("list", "--plugin", "no_such_module_here")[::2], "plugin 'no_such_module_here' is missing")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('half-written plugin')\n")
    one_line_error(*pyrossl("list", "--plugin", broken)[::2], "broken.py", "failed on import", "half-written plugin")


def test_an_installed_packages_entry_point_registers_its_guides(tmp_path):
    """The group ``pyrossl.plugins`` of an installed distribution is loaded in every process."""
    (tmp_path / "my_zoo_guides.py").write_text(GUIDES.read_text())
    info = tmp_path / "my_zoo_guides-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-zoo-guides\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pyrossl.plugins]\nguides = my_zoo_guides\n")
    code, out, err = pyrossl("list", env={"PYTHONPATH": str(tmp_path)})
    assert code == 0, err
    assert "qzx" in out and "smoothed-enum" in out


def test_family_registration_by_hand():
    from pyrossl.errors import ConfigError
    from pyrossl.guides.label import LABEL_GUIDES, EnumeratedLabelGuide
    from pyrossl.models.m2 import M2

    class Mine(EnumeratedLabelGuide):
        description = "mine"

    try:
        assert LABEL_GUIDES.register("mine-for-a-test", Mine) is Mine
        assert M2.guides["mine-for-a-test"] == "mine" and "mine-for-a-test" in M2.guides
        with pytest.raises(ConfigError, match="taken by Mine"):
            LABEL_GUIDES.register("mine-for-a-test", type("Other", (Mine,), {}))
        with pytest.raises(ConfigError, match="lacks description"):
            LABEL_GUIDES.register("nameless", type("Nameless", (EnumeratedLabelGuide,), {"description": ""}))
    finally:
        LABEL_GUIDES.unregister("mine-for-a-test")
    assert "mine-for-a-test" not in M2.guides
