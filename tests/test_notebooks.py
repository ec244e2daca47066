"""The notebook runs end to end on a run the test makes (M2 on digits, seconds)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from common import tiny_config
from pyrossl.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_inspect_posterior_notebook_runs(tmp_path, monkeypatch):
    run_dir = tmp_path / "m2-digits"
    train(
        tiny_config(
            model="m2", **{"data.labels_per_class": 10, "train.epochs": 3, "options": {"z_dim": 4, "hidden": [32]}}
        ),
        run_dir,
    )
    nb = nbformat.read(ROOT / "notebooks/inspect_posterior.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    monkeypatch.setenv("PYROSSL_RUN", str(run_dir))
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell when one fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum(o.output_type == "display_data" for o in outputs) >= 4  # the four figures
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "y_probs" in text and "'z'" in text


#: each tutorial and the least number of figures it must show
TUTORIALS = {"serket_vae_gmm": 4, "m2": 5, "ccvae": 4, "gae": 7, "vae": 4, "your_own_entry": 2, "your_own_guide": 4}


def test_every_notebook_is_the_build_of_its_source():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build", ROOT / "notebooks/src/build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for source in (ROOT / "notebooks/src").glob("*.py"):
        if source.name == "build.py":
            continue
        built = nbformat.writes(build.notebook(source.read_text())) + "\n"  # as nbformat.write leaves it
        assert (ROOT / f"notebooks/{source.stem}.ipynb").read_text() == built, f"rebuild notebooks/{source.stem}.ipynb"
    sources = {p.stem for p in (ROOT / "notebooks/src").glob("*.py")}
    assert set(TUTORIALS) <= sources
    assert {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")} <= sources, (
        "every notebook has its source in notebooks/src"
    )


@pytest.mark.parametrize("name", sorted(TUTORIALS))
def test_tutorial_runs_every_cell_and_shows_its_figures(name, tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / f"notebooks/{name}.ipynb", as_version=4)
    monkeypatch.setenv("PYROSSL_QUICK", "smoke")  # every cell on the least work; the site runs PYROSSL_QUICK=1
    monkeypatch.setenv("PYROSSL_TUTORIALS", str(tmp_path / "runs"))
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(figures) >= TUTORIALS[name], f"{name} showed {len(figures)} figures"
