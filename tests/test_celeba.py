"""The CelebA loader, on a small fixture written in CelebA's own folder layout."""

import numpy as np
import pytest
import torch
from PIL import Image

from pyrossl.cli import main
from pyrossl.data import load_dataset
from pyrossl.data.celeba import ATTRIBUTES_FILE, IMAGES, PAPER_ATTRIBUTES, PARTITION_FILE
from pyrossl.errors import ConfigError, DataError, DatasetNotFound

ALL_40 = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
PARTS = [0, 0, 0, 1, 2, 2]


def write_celeba(folder, parts=PARTS, seed=0):
    """A CelebA folder with len(parts) 178 x 218 faces: image i is one flat colour, its attributes random."""
    rng = np.random.default_rng(seed)
    (folder / IMAGES).mkdir(parents=True)
    values = rng.choice([-1, 1], size=(len(parts), len(ALL_40)))
    names = [f"{i + 1:06d}.jpg" for i in range(len(parts))]
    for i, name in enumerate(names):
        colour = np.array([40 * i % 256, (255 - 40 * i) % 256, 128], np.uint8)
        pixels = np.broadcast_to(colour, (218, 178, 3)).copy()
        pixels[:35] = 0  # a band the centre crop removes
        Image.fromarray(pixels).save(folder / IMAGES / name, quality=100)
    rows = [f"{n} " + " ".join(f"{v:2d}" for v in row) for n, row in zip(names, values)]
    (folder / ATTRIBUTES_FILE).write_text(f"{len(parts)}\n{' '.join(ALL_40)}\n" + "\n".join(rows) + "\n")
    (folder / PARTITION_FILE).write_text("".join(f"{n} {p}\n" for n, p in zip(names, parts)))
    return values


def test_loads_the_paper_attributes_at_64_pixels_with_the_official_test_part(tmp_path):
    values = write_celeba(tmp_path / "celeba")
    ds = load_dataset("celeba", data_dir=tmp_path)  # found in the celeba/ subfolder
    assert ds.x.shape == (6, 3, 64, 64) and ds.x.dtype == torch.float32
    assert ds.multilabel and ds.attributes == PAPER_ATTRIBUTES and ds.num_classes == 18
    columns = [ALL_40.index(a) for a in PAPER_ATTRIBUTES]
    assert torch.equal(ds.y, torch.from_numpy((values[:, columns] > 0).astype(np.float32)))
    assert ds.test_index.tolist() == [4, 5]
    # image 1 is flat (40, 215, 128) once the black band is cropped away (JPEG keeps it within a few levels)
    assert torch.allclose(ds.x[1].mean(dim=(1, 2)) * 255, torch.tensor([40.0, 215.0, 128.0]), atol=3)
    assert float(ds.x.min()) >= 0 and float(ds.x.max()) <= 1


def test_attribute_list_image_size_and_max_per_part(tmp_path):
    values = write_celeba(tmp_path)
    ds = load_dataset("celeba", data_dir=tmp_path, attributes=["Smiling", "Male"], image_size=32, max_per_part=2)
    assert ds.x.shape == (5, 3, 32, 32)  # two train, one validation, two test
    assert ds.attributes == ("Smiling", "Male")
    rows = [0, 1, 3, 4, 5]
    expected = values[rows][:, [ALL_40.index("Smiling"), ALL_40.index("Male")]] > 0
    assert torch.equal(ds.y, torch.from_numpy(expected.astype(np.float32)))
    assert ds.test_index.tolist() == [3, 4]


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (lambda f: (f / ATTRIBUTES_FILE).unlink(), DataError, "no attribute file list_attr_celeba.txt"),
        (lambda f: (f / PARTITION_FILE).unlink(), DataError, "no partition file"),
        (
            lambda f: (f / IMAGES / "000003.jpg").unlink(),
            DataError,
            "000003.jpg: listed in list_attr_celeba.txt but missing",
        ),
        (lambda f: (f / IMAGES / "000002.jpg").write_bytes(b"not a jpeg"), DataError, "not a readable image"),
        (
            lambda f: (f / ATTRIBUTES_FILE).write_text("2\nSmiling\na.jpg 1\n"),
            DataError,
            "announces 2 images but 1 rows",
        ),
        (lambda f: (f / ATTRIBUTES_FILE).write_text("1\nSmiling Male\na.jpg 1 0\n"), DataError, "line 3 should be"),
        (lambda f: (f / ATTRIBUTES_FILE).write_text("many\nSmiling\n"), DataError, "line 1 should be the image count"),
        (
            lambda f: (f / PARTITION_FILE).write_text("000001.jpg 7\n"),
            DataError,
            "line 1 should be an image name and 0, 1 or 2",
        ),
        (lambda f: (f / PARTITION_FILE).write_text("000001.jpg 0\n"), DataError, "no partition for 000002.jpg"),
    ],
    ids=[
        "no-attributes",
        "no-partition",
        "missing-image",
        "corrupt-image",
        "short-file",
        "bad-value",
        "bad-count",
        "bad-part",
        "unpartitioned",
    ],
)
def test_a_broken_folder_is_a_data_error_naming_the_file(tmp_path, damage, error, message):
    write_celeba(tmp_path)
    damage(tmp_path)
    with pytest.raises(error, match=message):
        load_dataset("celeba", data_dir=tmp_path)


def test_bad_options_and_missing_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("PYROSSL_DATA", raising=False)
    monkeypatch.setenv("PYROSSL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetNotFound, match="cannot be downloaded by pyrossl"):
        load_dataset("celeba", data_dir=tmp_path)
    write_celeba(tmp_path)
    with pytest.raises(ConfigError, match="unknown attribute 'Smilng' \\(did you mean 'Smiling'\\?\\)"):
        load_dataset("celeba", data_dir=tmp_path, attributes=["Smilng"])
    with pytest.raises(ConfigError, match="image_size must be a positive integer"):
        load_dataset("celeba", data_dir=tmp_path, image_size=0)
    with pytest.raises(ConfigError, match="has no option 'image_size'"):
        load_dataset("digits", image_size=32)


def test_cli_on_a_folder_without_its_attribute_file(tmp_path, capsys):
    write_celeba(tmp_path)
    (tmp_path / ATTRIBUTES_FILE).unlink()
    assert main(["data", "info", "celeba", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no attribute file list_attr_celeba.txt" in err and "Traceback" not in err


def test_cli_data_info(tmp_path, capsys):
    write_celeba(tmp_path)
    assert main(["data", "info", "celeba", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "celeba: 6 images of shape (3, 64, 64) (2 official test), 18 attributes: Arched_Eyebrows" in out
