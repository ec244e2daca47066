import shutil

import numpy as np
import pytest
from PIL import Image

from common import tiny_config
from pyrossl import cli, runs
from pyrossl.report import write_report
from pyrossl.train import train


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "m2"
    train(
        tiny_config(
            model="m2",
            **{
                "data.labels_per_class": 5,
                "train.epochs": 2,
                "train.figures": True,
                "options": {"z_dim": 4, "hidden": [32]},
            },
        ),
        out,
    )
    return out


def _drawn(path):
    """An image that is not one flat colour: something was drawn."""
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    return pixels.std() > 1.0


def test_report_redraws_every_figure_from_the_checkpoint(m2_run):
    shutil.rmtree(m2_run / runs.FIGURES)
    index, figures = write_report(m2_run)
    names = {p.name for p in figures}
    assert {
        "loss.png",
        "metrics.png",
        "latent_pca.png",
        "class_samples.png",
        "confusion.png",
        "reconstructions.png",
    } <= names
    assert all(p.exists() and _drawn(p) for p in figures)
    page = index.read_text()
    for name in names:
        assert f'src="{name}"' in page
    assert "test_accuracy" in page and "<table>" in page


def test_the_trainer_writes_the_index_too(m2_run):
    assert (m2_run / runs.FIGURES / "index.html").exists()


def test_report_cli(m2_run, tmp_path, capsys):
    assert cli.main(["report", str(m2_run), "--which", "last"]) == 0
    assert "index.html" in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_report_of_an_unsupervised_run_uses_its_training_points(tmp_path):
    out = tmp_path / "gmm"
    train(
        tiny_config(
            model="gmm-vae",
            **{
                "data.validation": 0,
                "data.test": 0,
                "train.epochs": 2,
                "options": {"z_dim": 3, "hidden": [32], "warmup_epochs": 1, "n_init": 1},
            },
        ),
        out,
    )
    _, figures = write_report(out)
    assert {"cluster_samples.png", "cluster_confusion.png", "latent_pca.png"} <= {p.name for p in figures}


def test_report_writes_nothing_where_it_should_not(m2_run, tmp_path, capsys):
    """A path that is not a run stays as it was; a figure planted as a link is refused, its target kept;
    a run that another process writes is refused with its holder."""
    plain = tmp_path / "not-a-run"
    plain.mkdir()
    assert cli.main(["report", str(plain)]) == 2
    assert f"{plain} is not a run directory" in capsys.readouterr().err and not list(plain.iterdir())
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"keep me")
    planted = m2_run / runs.FIGURES / "loss.png"
    planted.unlink()
    planted.symlink_to(outside)
    try:
        assert cli.main(["report", str(m2_run)]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err
            == f"pyrossl: error: {planted} is a symbolic link: a run directory's files are never written through one"
        )
        assert outside.read_bytes() == b"keep me"
    finally:
        planted.unlink()
    with runs.RunLock(m2_run, "pyrossl train"):
        assert cli.main(["report", str(m2_run)]) == 2
        assert f"{m2_run} is in use by pid" in capsys.readouterr().err
    assert cli.main(["report", str(m2_run)]) == 0 and _drawn(planted)


def test_figures_show_every_class_of_a_class_sorted_part(tmp_path):
    """Parts are stored sorted by class: the figures draw a stratified, interleaved sample, so the ten
    reconstructions are ten classes and the latent plot holds every class of the part."""
    import torch

    from pyrossl.report import draw_figures

    class Recording:
        latent_title = "posterior means of q(z|x)"

        def eval(self):
            pass

        def latent(self, x):
            self.latent_rows = x[:, 0, 0, 0].long()
            return torch.randn(len(x), 2)

        def figures(self, x, y, outputs=None):
            self.first_ten = y[:10]
            return []

    class Data:
        multilabel, name, classes = False, "sorted", [str(c) for c in range(10)]

    y = torch.arange(10).repeat_interleave(
        torch.tensor([600, 500, 400, 300, 300, 300, 300, 300, 2, 1])
    )  # 3,003, sorted
    x = y.float().reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()  # each image carries its class
    model = Recording()
    draw_figures(model, Data(), [], x, y, tmp_path, seed=3)
    assert sorted(model.first_ten.tolist()) == list(range(10))
    drawn = torch.bincount(model.latent_rows, minlength=10)
    assert len(model.latent_rows) == 2000 and (drawn > 0).all()  # classes 8 and 9 (3 images) included
    assert abs(drawn[0].item() - 2000 * 600 / 3003) <= 2  # otherwise each class its share
    assert Image.open(tmp_path / "latent_pca.png").size[0] > 0
