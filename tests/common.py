"""Helpers the tests share (``from common import tiny_config``); conftest.py keeps the fixtures."""

import torch


def tiny_config(**overrides):
    """A VAE on sklearn's digits that trains in about a second."""
    from pyrossl.config import config_from_dict

    raw = {
        "model": "vae",
        "seed": 0,
        "data": {"name": "digits", "labels_per_class": 0, "validation": 0.1, "test": 0.2},
        "train": {"epochs": 3, "batch_size": 128, "lr": 3e-3, "progress": False},
        "options": {"z_dim": 4, "hidden": [32]},
    }
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (raw.setdefault(section, {}) if section else raw)[name] = value
    if raw["model"] != "vae" and "options" not in overrides:
        raw["options"] = {}
    return config_from_dict(raw)


def one_checked_step(model, x, x_lab, y_lab):
    """One Adam step of a zoo entry's loss: finite, and every parameter gets a finite gradient."""
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model(x, x_lab, y_lab)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    optimiser.step()
    return loss


class WritesAFile:
    """Pickles to ``open(target, "w")``: a checkpoint holding it would create a file when unpickled."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


class FileWrapper:
    """Stands in for a file the write layer opened (fault injection at :data:`pyrossl.files._fdopen`):
    every attribute is the file's; a subclass changes ``write``."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


class DiskFull(FileWrapper):
    """A file on a disk that fills after ``room`` bytes: ``write`` raises ENOSPC."""

    def __init__(self, file, room=0):
        super().__init__(file)
        self.room = room

    def write(self, data):
        import errno

        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)
