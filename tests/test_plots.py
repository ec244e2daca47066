"""Image-grid arithmetic, and that every figure function writes a PNG and leaves no figure open."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pyrossl import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > 100
    assert data[:8] == PNG_MAGIC


@pytest.fixture(autouse=True)
def no_open_figures():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before == set()


def numbered_images(n, c, h, w):
    """Image i has every pixel equal to (i + 1) / 100, so each lands somewhere recognisable."""
    return np.broadcast_to((np.arange(n) + 1.0)[:, None, None, None] / 100, (n, c, h, w)).copy()


def test_image_grid_shape_and_placement():
    # 5 images of 2 x 3, 3 per row, padding 1: 2 rows -> 2 * (2 + 1) + 1 = 7 pixels high,
    # 3 columns -> 3 * (3 + 1) + 1 = 13 pixels wide.
    images = numbered_images(5, 1, 2, 3)
    grid = plots.image_grid(torch.tensor(images), nrow=3, padding=1, pad_value=1.0)
    assert grid.shape == (7, 13)
    for i in range(5):
        top, left = 1 + (i // 3) * 3, 1 + (i % 3) * 4
        np.testing.assert_allclose(grid[top : top + 2, left : left + 3], (i + 1) / 100)
    # Padding rows/columns and the empty sixth cell hold pad_value.
    assert (grid[0] == 1.0).all() and (grid[:, 0] == 1.0).all() and (grid[3] == 1.0).all()
    assert (grid[4:6, 9:12] == 1.0).all()
    # Every pixel is either padding or image: 5 images of 6 pixels.
    assert (grid != 1.0).sum() == 5 * 6


def test_image_grid_rgb_and_no_padding():
    images = np.zeros((2, 3, 2, 2))
    images[0, 0] = 1.0  # red
    images[1, 2] = 1.0  # blue
    grid = plots.image_grid(images, nrow=2, padding=0)
    assert grid.shape == (2, 4, 3)
    np.testing.assert_array_equal(grid[:, :2], np.broadcast_to([1.0, 0.0, 0.0], (2, 2, 3)))
    np.testing.assert_array_equal(grid[:, 2:], np.broadcast_to([0.0, 0.0, 1.0], (2, 2, 3)))


def test_image_grid_fewer_images_than_nrow_and_bad_shapes():
    assert plots.image_grid(np.zeros((2, 1, 4, 4)), nrow=10, padding=2).shape == (8, 14)
    assert plots.image_grid(np.zeros((3, 4, 4)), nrow=3, padding=0).shape == (4, 12)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        plots.image_grid(np.zeros((2, 2, 4, 4)), nrow=2)
    with pytest.raises(ValueError, match="nrow"):
        plots.image_grid(np.zeros((2, 1, 4, 4)), nrow=0)


def test_save_image_grid(tmp_path):
    images = torch.rand(6, 1, 8, 8)
    out = plots.save_image_grid(
        images, tmp_path / "a" / "b" / "grid.png", nrow=3, title="samples", row_labels=["zero", "one"]
    )
    assert_png(out)
    assert_png(plots.save_image_grid(torch.rand(4, 3, 8, 8), str(tmp_path / "rgb.png"), nrow=2))
    with pytest.raises(ValueError, match="row_labels"):
        plots.save_image_grid(images, tmp_path / "bad.png", nrow=3, row_labels=["one"])


def test_plot_curves(tmp_path):
    records = [
        {"epoch": 1, "loss": 3.0, "accuracy": 0.5},
        {"epoch": 2, "loss": 2.0},
        {"epoch": 3, "loss": None, "accuracy": float("nan")},
        {"epoch": 4, "loss": 1.5, "accuracy": 0.7, "per_class_accuracy": [0.1, 0.2]},
    ]
    out = plots.plot_curves(
        records, ["loss", "accuracy", "per_class_accuracy", "missing"], tmp_path / "curves" / "c.png", title="training"
    )
    assert_png(out)
    assert_png(plots.plot_curves(records, "missing", tmp_path / "empty.png"))


def test_plot_confusion(tmp_path):
    cm = np.array([[5, 1, 0], [0, 3, 0], [0, 0, 0]])
    assert_png(plots.plot_confusion(cm, ["cat", "dog", "bird"], tmp_path / "cm" / "n.png"))
    assert_png(plots.plot_confusion(torch.tensor(cm), None, tmp_path / "counts.png", normalize=False))
    with pytest.raises(ValueError, match="classes"):
        plots.plot_confusion(cm, ["a", "b"], tmp_path / "bad.png")


def test_plot_latent_pca(tmp_path):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(30, 5, generator=g)
    labels = torch.arange(30) % 3
    assert_png(plots.plot_latent_pca(z, labels, tmp_path / "pca" / "z.png", classes=["a", "b", "c"], title="latent"))
    assert_png(plots.plot_latent_pca(z[:, :2].numpy(), labels.numpy(), tmp_path / "z2.png"))
    with pytest.raises(ValueError, match="labels"):
        plots.plot_latent_pca(z, labels[:5], tmp_path / "bad.png")


def test_plot_latent_tsne_keeps_separated_classes_apart(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    z = torch.randn(60, 8, generator=g) * 0.3 + 10 * torch.nn.functional.one_hot(labels, 8)
    assert_png(plots.plot_latent_pca(z, labels, tmp_path / "tsne.png", method="tsne"))
    points = plots._tsne_2d(z.double().numpy())
    nearest = torch.cdist(torch.from_numpy(points), torch.from_numpy(points)).fill_diagonal_(float("inf")).argmin(1)
    assert (labels[nearest] == labels).all()
    with pytest.raises(ValueError, match="method"):
        plots.plot_latent_pca(z, labels, tmp_path / "bad.png", method="umap")


def test_plot_latent_pca_on_a_given_axes(tmp_path):
    fig = Figure()
    ax = fig.add_subplot()
    assert plots.plot_latent_pca(torch.randn(12, 3), torch.arange(12) % 2, None, ax=ax) is None
    assert len(ax.collections) == 2
    assert_png(plots.plot_latent_pca(torch.randn(12, 3), torch.arange(12) % 2, tmp_path / "ax.png", ax=ax))
    with pytest.raises(ValueError, match="path"):
        plots.plot_latent_pca(torch.randn(12, 3), torch.arange(12) % 2, None)


def test_plot_reconstructions(tmp_path):
    x = torch.rand(12, 1, 6, 6)
    assert_png(plots.plot_reconstructions(x, x.flip(0), tmp_path / "rec" / "r.png", n=5))
    assert_png(plots.plot_reconstructions(x, x.reshape(12, -1), tmp_path / "flat.png"))
    with pytest.raises(ValueError, match="x_rec"):
        plots.plot_reconstructions(x, torch.rand(12, 35), tmp_path / "bad.png")


def test_plot_kl_per_unit(tmp_path):
    records = [
        {"epoch": 1, "val_kl_per_unit": [0.5, 0.0, 2.0], "val_active_units": 2},
        {"epoch": 2},  # not evaluated
        {"epoch": 3, "val_kl_per_unit": [0.7, 0.001, 2.5], "val_active_units": 2},
    ]
    assert_png(plots.plot_kl_per_unit(records, "val_", tmp_path / "kl.png"))
    assert_png(plots.plot_kl_per_unit([{"epoch": 1}], "val_", tmp_path / "none.png"))
