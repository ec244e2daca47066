"""Entries say what to draw (pyrossl.figures.Figure), the report layer draws it; model modules load
nothing of plotting, run folders or training."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyrossl.figures import KINDS, Figure
from pyrossl.report import draw

ROOT = Path(__file__).resolve().parents[1]
#: what a model or guide module may not import: it is the generative story and its guide, no more
ABOVE = (
    "pyrossl.plots",
    "pyrossl.runs",
    "pyrossl.train",
    "pyrossl.report",
    "pyrossl.cli",
    "pyrossl.ablate",
    "matplotlib",
)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, function-level imports included (``from pyrossl import plots``
    counts as ``pyrossl.plots``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "models").glob("*.py")) + sorted((ROOT / "guides").glob("*.py")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_models_and_guides_import_nothing_above_them(path):
    above = sorted(m for m in _imports(path) if any(m == a or m.startswith(a + ".") for a in ABOVE))
    assert not above, f"{path.name} imports {', '.join(above)}"


def test_importing_every_entry_loads_no_plotting_run_folder_or_trainer():
    code = (
        "import sys, pyrossl.models.vae, pyrossl.models.m2, pyrossl.models.gmm_vae, pyrossl.models.serket_vae_gmm, "
        "pyrossl.models.gae, "
        "pyrossl.models.ccvae, pyrossl.models.classifier\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.startswith({ABOVE!r}))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_a_figure_is_a_known_kind_with_a_plain_name():
    with pytest.raises(ValueError, match="kind"):
        Figure("x", "histogram")
    for name in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="file stem"):
            Figure.images(name, torch.zeros(1, 1, 4, 4))
    moved = Figure.reconstructions("r", torch.zeros(2, 1, 4, 4, requires_grad=True), torch.ones(2, 16))
    assert not moved.arguments["x"].requires_grad  # detached: a figure outlives its batch


def test_every_kind_is_drawn_into_its_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(20, 1, 8, 8, generator=g)
    labels = torch.arange(20) % 4
    figures = [
        Figure.images("grid", images, nrow=10, title="a grid", row_labels=["one", "two"]),
        Figure.reconstructions("rec", images[:10], images[:10].flip(-1)),
        Figure.confusion("cm", np.eye(4) * 5 + 1, ["a", "b", "c", "d"]),
        Figure.latent("z", torch.randn(20, 3, generator=g), labels, classes=["a", "b", "c", "d"], title="codes"),
        Figure.latent_pair("pair", torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g), labels),
    ]
    assert {f.kind for f in figures} == set(KINDS)
    for figure in figures:
        path = draw(figure, tmp_path)
        assert path == tmp_path / f"{figure.name}.png"
        pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
        assert pixels.std() > 1.0, figure.name  # something was drawn
    assert not list(tmp_path.glob(".*.tmp"))
