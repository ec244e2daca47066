import pickle

import pytest
import torch

from conftest import tiny_config
from pyrossl import runs
from pyrossl.errors import CheckpointError
from pyrossl.train import train


def test_atomic_save_round_trip(tmp_path):
    path = tmp_path / "sub" / "c.pt"
    runs.atomic_save({"w": torch.arange(3), "n": 2}, path)
    loaded = runs.load_checkpoint(path)
    assert torch.equal(loaded["w"], torch.arange(3)) and loaded["n"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary file left


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "c.pt"
    runs.atomic_save({"v": 1}, path)

    def broken(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        runs.atomic_write_bytes(path, broken)
    assert runs.load_checkpoint(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


class _WritesAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"model": _WritesAFile(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="not a safe pyrossl checkpoint"):
        runs.load_checkpoint(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_WritesAFile(str(marker))))
    with pytest.raises(CheckpointError):
        runs.load_checkpoint(raw)
    assert not marker.exists()


def test_garbage_and_missing_checkpoints(tmp_path):
    import random

    rng = random.Random(0)
    good = tmp_path / "good.pt"
    runs.atomic_save({"w": torch.ones(3)}, good)
    blob = good.read_bytes()
    cases = [bytes(rng.randrange(256) for _ in range(64)) for _ in range(50)] + [blob[: len(blob) // 2], b"", b"PK\x03\x04"]
    for i, data in enumerate(cases):
        (tmp_path / "g.pt").write_bytes(data)
        with pytest.raises(CheckpointError, match="not a"):
            runs.load_checkpoint(tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        runs.load_checkpoint(tmp_path / "none.pt")


def test_load_run_restores_the_trained_model(tmp_path):
    train(tiny_config(), tmp_path / "run")
    run = runs.load_run(tmp_path / "run", which="last")
    saved = runs.load_checkpoint(tmp_path / "run" / runs.CHECKPOINT)["model"]
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    x, y = run.tensors("test")
    assert x.shape[0] == run.split.test.numel() == len(y)
    assert run.latent(x).shape == (x.shape[0], 4)
    assert run.reconstruct(x).shape == x.shape
    assert run.sample(5).shape == (5, 1, 8, 8)
    assert [r["epoch"] for r in run.metrics] == [1, 2, 3]
    assert run.summary["model"] == "vae"
    best = runs.load_run(tmp_path / "run")
    best_saved = runs.load_checkpoint(tmp_path / "run" / runs.BEST)["model"]
    assert all(torch.equal(v, best_saved[k]) for k, v in best.model.state_dict().items())
    with pytest.raises(Exception, match="which"):
        runs.load_run(tmp_path / "run", which="first")
