"""Dataset loaders: bundled sets, IDX files in every supported layout, npz archives, and their errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pyrossl.data import DATASETS, dataset_names, load_dataset, sources, write_idx
from pyrossl.errors import ConfigError, DataError, DatasetNotFound

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Point every search root at empty temporary folders, so files on this machine cannot interfere."""
    monkeypatch.delenv("PYROSSL_DATA", raising=False)
    monkeypatch.setenv("PYROSSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SYSTEM_DATA_ROOT", tmp_path / "system")
    return tmp_path


def write_idx_set(folder: Path, train: int = 6, test: int = 4, gz: bool = True, side: int = 4, seed: int = 0) -> None:
    """Write the four IDX files of a tiny MNIST-like dataset, labels cycling through 0-9."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for part, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (count, side, side), dtype=np.uint8)
        write_idx(folder / f"{part}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{part}-labels-idx1-ubyte{suffix}", (np.arange(count) % 10).astype(np.uint8))


def test_registry_names():
    assert (
        dataset_names()
        == sorted(DATASETS)
        == ["celeba", "digits", "fashion-mnist", "mnist", "mnist5k", "npz", "shapes"]
    )


def test_digits():
    ds = load_dataset("digits")
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == torch.float32
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert ds.y.dtype == torch.int64 and set(ds.y.tolist()) == set(range(10))
    assert ds.classes == tuple("0123456789") and ds.test_index is None and ds.source


def test_mnist5k():
    ds = load_dataset("mnist5k")
    assert ds.x.shape == (5000, 1, 28, 28) and ds.x.dtype == torch.float32
    assert 0.0 <= float(ds.x.min()) and float(ds.x.max()) == 1.0
    assert torch.bincount(ds.y).tolist() == [500] * 10
    assert ds.classes == tuple("0123456789") and ds.test_index is None


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("layout", ["root", "root/name", "torchvision"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_idx_dataset_in_every_layout(isolated, name, layout, gz):
    root = isolated / "data"
    folder = {
        "root": root,
        "root/name": root / name,
        "torchvision": root / sources.TORCHVISION_FOLDERS[name] / "raw",
    }[layout]
    write_idx_set(folder, train=6, test=4, gz=gz)
    ds = load_dataset(name, data_dir=root)
    assert ds.name == name
    assert ds.x.shape == (10, 1, 4, 4) and ds.x.dtype == torch.float32
    assert 0 <= float(ds.x.min()) and float(ds.x.max()) <= 1
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert ds.test_index.tolist() == [6, 7, 8, 9]
    assert str(folder) in ds.source
    expected_classes = sources.FASHION_MNIST_CLASSES if name == "fashion-mnist" else tuple("0123456789")
    assert ds.classes == expected_classes and len(ds.classes) == 10


def test_pixels_are_scaled_exactly(isolated):
    folder = isolated / "data"
    write_idx_set(folder, gz=False)
    write_idx(folder / "train-images-idx3-ubyte", np.full((6, 4, 4), 51, dtype=np.uint8))
    ds = load_dataset("mnist", data_dir=folder)
    assert torch.allclose(ds.x[:6], torch.full((6, 1, 4, 4), 0.2))


def test_search_order(isolated, monkeypatch):
    """data_dir, then $PYROSSL_DATA, then the system folder, then the cache; told apart by their sizes."""
    write_idx_set(isolated / "explicit", train=1)
    write_idx_set(isolated / "env" / "mnist", train=2)
    write_idx_set(isolated / "system" / "mnist", train=3)
    write_idx_set(isolated / "cache" / "mnist" / "MNIST" / "raw", train=4)
    monkeypatch.setenv("PYROSSL_DATA", str(isolated / "env"))
    assert len(load_dataset("mnist", data_dir=isolated / "explicit")) == 1 + 4
    assert len(load_dataset("mnist")) == 2 + 4
    monkeypatch.delenv("PYROSSL_DATA")
    assert len(load_dataset("mnist")) == 3 + 4
    monkeypatch.setattr(sources, "SYSTEM_DATA_ROOT", isolated / "elsewhere")
    assert len(load_dataset("mnist")) == 4 + 4


def test_incomplete_folder_is_passed_over(isolated):
    write_idx_set(isolated / "data", train=1)
    (isolated / "data" / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx_set(isolated / "cache" / "mnist", train=5)
    assert len(load_dataset("mnist", data_dir=isolated / "data")) == 5 + 4


def test_mixed_compression_in_one_folder(isolated):
    write_idx_set(isolated / "data", gz=True)
    (isolated / "data" / "train-labels-idx1-ubyte.gz").unlink()
    write_idx(isolated / "data" / "train-labels-idx1-ubyte", np.arange(6, dtype=np.uint8))
    assert load_dataset("mnist", data_dir=isolated / "data").y[:6].tolist() == list(range(6))


def test_missing_data_dir_is_an_error(isolated):
    with pytest.raises(DataError, match="does not exist") as caught:
        load_dataset("mnist", data_dir=isolated / "absent")
    assert not isinstance(caught.value, DatasetNotFound)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_not_found_lists_the_places_searched(isolated, monkeypatch, name):
    monkeypatch.setenv("PYROSSL_DATA", str(isolated / "env"))
    (isolated / "given").mkdir()
    with pytest.raises(DatasetNotFound) as caught:
        load_dataset(name, data_dir=isolated / "given")
    message = str(caught.value)
    assert "\n" not in message
    for folder in sources.idx_search_folders(name, isolated / "given"):
        assert str(folder) in message
    assert str(isolated / "system" / name) in message and str(isolated / "cache" / name) in message
    assert f"pyrossl data download {name}" in message
    assert ("apt-get install dataset-fashion-mnist" in message) == (name == "fashion-mnist")


def test_image_and_label_counts_must_agree(isolated):
    write_idx_set(isolated / "data")
    write_idx(isolated / "data" / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match="holds 6 images but .*train-labels-idx1-ubyte.gz holds 5 labels"):
        load_dataset("mnist", data_dir=isolated / "data")


def test_labels_must_be_digits(isolated):
    write_idx_set(isolated / "data")
    write_idx(isolated / "data" / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 10, 2], dtype=np.uint8))
    with pytest.raises(DataError, match="labels must be 0-9, found 0 to 10"):
        load_dataset("fashion-mnist", data_dir=isolated / "data")


def test_train_and_test_images_must_have_one_size(isolated):
    write_idx_set(isolated / "data")
    write_idx(isolated / "data" / "t10k-images-idx3-ubyte.gz", np.zeros((4, 5, 5), dtype=np.uint8))
    with pytest.raises(DataError, match=r"\(4, 4\) images but .* \(5, 5\) images"):
        load_dataset("mnist", data_dir=isolated / "data")


def test_images_must_be_bytes(isolated):
    write_idx_set(isolated / "data")
    write_idx(isolated / "data" / "train-images-idx3-ubyte.gz", np.zeros((6, 4, 4), dtype=np.float32))
    with pytest.raises(DataError, match="expected unsigned bytes"):
        load_dataset("mnist", data_dir=isolated / "data")


def test_corrupt_file_is_reported(isolated):
    write_idx_set(isolated / "data")
    (isolated / "data" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: corrupt gzip data"):
        load_dataset("mnist", data_dir=isolated / "data")


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("PYROSSL_DATA", raising=False)
    ds = load_dataset("fashion-mnist")
    assert ds.x.shape == (70000, 1, 28, 28) and ds.test_index.tolist() == list(range(60000, 70000))
    assert torch.bincount(ds.y).tolist() == [7000] * 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


# npz archives


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "shape, image_shape",
    [((5, 16), (1, 4, 4)), ((5, 12), (1, 1, 12)), ((5, 3, 7), (1, 3, 7)), ((5, 3, 2, 2), (3, 2, 2))],
)
def test_npz_shapes(tmp_path, shape, image_shape):
    x = np.random.default_rng(0).random(shape)
    path = save_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 1, 0]))
    ds = load_dataset("npz", path=path)
    assert ds.image_shape == image_shape and ds.x.dtype == torch.float32
    assert torch.allclose(ds.x.reshape(5, -1), torch.from_numpy(x.reshape(5, -1)).float())
    assert ds.y.dtype == torch.int64 and ds.classes == ("0", "1", "2") and ds.test_index is None


def test_npz_with_test_part_classes_and_bytes(tmp_path):
    path = save_npz(
        tmp_path / "d.npz",
        x=np.full((4, 2, 2), 255, dtype=np.uint8),
        y=np.array([0, 1, 0, 1]),
        x_test=np.zeros((2, 2, 2), dtype=np.uint8),
        y_test=np.array([2, 2]),
        classes=np.array(["cat", "dog", "bird", "fish"]),
    )
    ds = load_dataset("npz", path=str(path))
    assert ds.x.shape == (6, 1, 2, 2) and float(ds.x[:4].min()) == 1.0 and float(ds.x[4:].max()) == 0.0
    assert ds.test_index.tolist() == [4, 5] and ds.y.tolist() == [0, 1, 0, 1, 2, 2]
    assert ds.classes == ("cat", "dog", "bird", "fish") and ds.num_classes == 4


def test_npz_needs_a_path():
    with pytest.raises(ConfigError, match="path="):
        load_dataset("npz")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"y": np.zeros(3, int)}, r"no array 'x' \(arrays present: y\)"),
        ({"x": np.zeros((3, 4)), "labels": np.zeros(3, int)}, r"no array 'y' \(arrays present: labels, x\)"),
        ({"x": np.zeros((3, 4)), "y": np.zeros(3, int), "x_test": np.zeros((1, 4))}, "not the other"),
        ({"x": np.full((3, 4), np.nan), "y": np.zeros(3, int)}, "holds 12 non-finite values"),
        ({"x": np.array([[0.0, np.inf], [0.5, 1.0]]), "y": np.zeros(2, int)}, "holds 1 non-finite values"),
        ({"x": np.full((3, 4), 255.0), "y": np.zeros(3, int)}, r"range from 255 to 255; scale them to \[0, 1\]"),
        ({"x": np.full((3, 4), -0.5), "y": np.zeros(3, int)}, "range from -0.5 to -0.5"),
        ({"x": np.zeros((3, 4), np.int64), "y": np.zeros(3, int)}, "store uint8"),
        ({"x": np.zeros((3, 1, 1, 2, 2)), "y": np.zeros(3, int)}, "expected"),
        ({"x": np.zeros((0, 4)), "y": np.zeros(0, int)}, "holds no examples"),
        ({"x": np.zeros((3, 4)), "y": np.array([0, -1, 2])}, "negative labels"),
        ({"x": np.zeros((3, 4)), "y": np.array([0.0, 1.0, 1.0])}, "store class indices as integers"),
        ({"x": np.zeros((3, 4)), "y": np.zeros(2, int)}, r"'y' has shape \(2,\), expected \(3,\)"),
        ({"x": np.zeros((3, 4)), "y": np.array([0, 1, 2]), "classes": np.array(["a", "b"])}, "labels go up to 2"),
        (
            {"x": np.zeros((2, 4)), "y": np.zeros(2, int), "x_test": np.zeros((1, 9)), "y_test": np.zeros(1, int)},
            "'x_test' images are",
        ),
    ],
    ids=[
        "no-x",
        "no-y",
        "half-test",
        "nan",
        "inf",
        "above-1",
        "below-0",
        "int-x",
        "5-dims",
        "empty",
        "negative-y",
        "float-y",
        "y-length",
        "y-beyond-classes",
        "test-shape",
    ],
)
def test_npz_errors(tmp_path, arrays, message):
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message) as caught:
        load_dataset("npz", path=path)
    assert str(path) in str(caught.value)


def test_npz_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset("npz", path=tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(DataError, match="cannot read as .npz"):
        load_dataset("npz", path=tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        load_dataset("npz", path=tmp_path / "single.npy")
    path = save_npz(tmp_path / "objects.npz", x=np.zeros((2, 4)), y=np.array([0, 1], dtype=object))
    with pytest.raises(DataError, match="cannot read as .npz"):
        load_dataset("npz", path=path)


def test_unknown_dataset_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown dataset 'fashion_mnist' \(did you mean 'fashion-mnist'\?\)"):
        load_dataset("fashion_mnist")
    with pytest.raises(ConfigError, match="known: celeba, digits, fashion-mnist, mnist, mnist5k, npz"):
        load_dataset("cifar")


def test_unknown_option_suggests_the_closest_one(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset 'npz' has no option 'pth' \(did you mean 'path'\?\)"):
        load_dataset("npz", pth=tmp_path / "d.npz")
    with pytest.raises(ConfigError, match="options: none"):
        load_dataset("digits", scale=2)
