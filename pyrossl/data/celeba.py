"""CelebA, read from the folder layout the dataset is distributed in (it cannot be downloaded here).

A CelebA folder holds::

    img_align_celeba/000001.jpg ...   the aligned 178 x 218 faces
    list_attr_celeba.txt              line 1: the image count; line 2: the 40 attribute names;
                                      then "000001.jpg  -1  1 ..." (one +-1 per attribute)
    list_eval_partition.txt           "000001.jpg 0" (0 train, 1 validation, 2 test)

It is looked for in ``data_dir``, ``$PYROSSL_DATA`` and the cache folder, each as given and with a
``celeba`` subfolder (torchvision's layout). Images are centre-cropped to a square (148 pixels, or the
shorter side when smaller), resized to ``image_size`` with Pillow's antialiasing bilinear filter and
scaled to [0, 1]. Labels are ``float32 [N, A]`` in {0, 1} for the chosen attributes; the official test
partition is ``test_index`` (training and validation images are pooled: the split holds out its own
validation set).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pyrossl.data.dataset import Dataset, choose_attributes
from pyrossl.data.download import cache_dir
from pyrossl.errors import ConfigError, DataError, DatasetNotFound

IMAGES = "img_align_celeba"
ATTRIBUTES_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
CROP = 148

#: The 18 attributes Joy et al. (2021) use: the ones a face image shows clearly enough to classify.
PAPER_ATTRIBUTES = (
    "Arched_Eyebrows",
    "Bags_Under_Eyes",
    "Bangs",
    "Black_Hair",
    "Blond_Hair",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Eyeglasses",
    "Heavy_Makeup",
    "Male",
    "No_Beard",
    "Pale_Skin",
    "Receding_Hairline",
    "Smiling",
    "Wavy_Hair",
    "Wearing_Necktie",
    "Young",
)


def celeba_search_folders(data_dir=None) -> list[Path]:
    roots = [Path(data_dir).expanduser()] if data_dir is not None else []
    if env_root := os.environ.get("PYROSSL_DATA"):
        roots.append(Path(env_root).expanduser())
    roots.append(cache_dir())
    folders: list[Path] = []
    for root in roots:
        for folder in (root, root / "celeba"):
            if folder not in folders:
                folders.append(folder)
    return folders


def find_celeba(data_dir=None) -> Path:
    """The first searched folder that holds ``img_align_celeba/``; its files are checked by the loader."""
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise DataError(f"data_dir {data_dir} does not exist or is not a folder")
    folders = celeba_search_folders(data_dir)
    for folder in folders:
        if (folder / IMAGES).is_dir():
            return folder
    raise DatasetNotFound(
        f"celeba not found: no folder holds {IMAGES}/; searched {', '.join(map(str, folders))}; "
        f"CelebA cannot be downloaded by pyrossl: get it from its authors and pass data_dir or set PYROSSL_DATA"
    )


def read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(image names, the 40 attribute names, int8 [N, 40] of +-1) from ``list_attr_celeba.txt``."""
    if not path.is_file():
        raise DataError(
            f"{path.parent}: no attribute file {ATTRIBUTES_FILE}; a CelebA folder needs it beside {IMAGES}/"
        )
    lines = path.read_text(errors="replace").splitlines()
    if len(lines) < 2:
        raise DataError(f"{path}: expected the image count on line 1 and the attribute names on line 2")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DataError(f"{path}: line 1 should be the image count, not {lines[0][:40]!r}") from None
    names = lines[1].split()
    rows = [line.split() for line in lines[2:] if line.strip()]
    if len(rows) != count:
        raise DataError(f"{path}: line 1 announces {count} images but {len(rows)} rows follow")
    values = np.empty((len(rows), len(names)), np.int8)
    for i, row in enumerate(rows):
        if len(row) != len(names) + 1 or any(v not in ("1", "-1") for v in row[1:]):
            raise DataError(f"{path}: line {i + 3} should be an image name and {len(names)} values of 1 or -1")
        values[i] = [int(v) for v in row[1:]]
    return [row[0] for row in rows], names, values


def read_partition(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise DataError(f"{path.parent}: no partition file {PARTITION_FILE}; a CelebA folder needs it beside {IMAGES}/")
    partition = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path}: line {number} should be an image name and 0, 1 or 2")
        partition[parts[0]] = int(parts[1])
    return partition


def load_image(path: Path, size: int) -> np.ndarray:
    """uint8 [3, size, size]: the centre square crop of the image, resized."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            w, h = image.size
            side = min(CROP, w, h)
            left, top = (w - side) // 2, (h - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except FileNotFoundError:
        raise DataError(f"{path}: listed in {ATTRIBUTES_FILE} but missing") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None


def load_celeba(
    *,
    data_dir=None,
    attributes: Sequence[str] | None = None,
    image_size: int | None = None,
    max_per_part: int | None = None,
) -> Dataset:
    """CelebA as a multi-label :class:`Dataset` (see the module docstring for the layout).

    ``attributes``: names from ``list_attr_celeba.txt`` (default: :data:`PAPER_ATTRIBUTES`);
    ``image_size``: side of the square images (default 64); ``max_per_part``: read at most this many
    images of each official partition, the first in file order (for a quick look: the full set is
    202,599 images, about 10 GB as float32 at 64 x 64).
    """
    size = 64 if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"celeba: image_size must be a positive integer, not {image_size!r}")
    if max_per_part is not None and (
        isinstance(max_per_part, bool) or not isinstance(max_per_part, int) or max_per_part < 1
    ):
        raise ConfigError(f"celeba: max_per_part must be a positive integer, not {max_per_part!r}")
    folder = find_celeba(data_dir)
    files, names, values = read_attributes(folder / ATTRIBUTES_FILE)
    chosen = choose_attributes("celeba", attributes, PAPER_ATTRIBUTES, names)
    columns = [names.index(name) for name in chosen]
    partition = read_partition(folder / PARTITION_FILE)
    missing = [f for f in files if f not in partition]
    if missing:
        raise DataError(f"{folder / PARTITION_FILE}: no partition for {missing[0]} ({len(missing)} images in all)")

    rows: list[int] = []
    for part in (0, 1, 2):
        in_part = [i for i, f in enumerate(files) if partition[f] == part]
        rows += in_part[:max_per_part] if max_per_part else in_part
    x = (
        np.stack([load_image(folder / IMAGES / files[i], size) for i in rows])
        if rows
        else np.zeros((0, 3, size, size), np.uint8)
    )
    y = (values[rows][:, columns] > 0).astype(np.float32)
    is_test = np.array([partition[files[i]] == 2 for i in rows], bool)
    return Dataset(
        name="celeba",
        x=torch.from_numpy(x).to(torch.float32).div_(255.0),
        y=torch.from_numpy(y).reshape(len(rows), len(columns)),
        attributes=tuple(chosen),
        test_index=torch.from_numpy(np.flatnonzero(is_test)).long(),
        source=f"CelebA folder {folder}",
    )
