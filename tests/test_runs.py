import pickle

import pytest
import torch

from common import WritesAFile, tiny_config
from pyrossl import runs
from pyrossl.errors import CheckpointError, PyrosslError, WriteError
from pyrossl.run import load_run
from pyrossl.train import train


def test_atomic_save_round_trip(tmp_path):
    path = tmp_path / "sub" / "c.pt"
    path.parent.mkdir()  # (a write makes no folder: a run deleted while it trains is noticed)
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

    with pytest.raises(WriteError, match=r"\(the disk is full\)$"):
        runs.atomic_write_bytes(path, broken)
    assert runs.load_checkpoint(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"model": WritesAFile(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="not a safe pyrossl checkpoint"):
        runs.load_checkpoint(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(WritesAFile(str(marker))))
    with pytest.raises(CheckpointError):
        runs.load_checkpoint(raw)
    assert not marker.exists()


def test_garbage_and_missing_checkpoints(tmp_path):
    import random

    rng = random.Random(0)
    good = tmp_path / "good.pt"
    runs.atomic_save({"w": torch.ones(3)}, good)
    blob = good.read_bytes()
    cases = [bytes(rng.randrange(256) for _ in range(64)) for _ in range(50)] + [
        blob[: len(blob) // 2],
        b"",
        b"PK\x03\x04",
    ]
    for data in cases:
        (tmp_path / "g.pt").write_bytes(data)
        with pytest.raises(CheckpointError, match="not a"):
            runs.load_checkpoint(tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        runs.load_checkpoint(tmp_path / "none.pt")


def test_load_run_restores_the_trained_model(tmp_path):
    train(tiny_config(), tmp_path / "run")
    run = load_run(tmp_path / "run", which="last")
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
    best = load_run(tmp_path / "run")
    best_saved = runs.load_checkpoint(tmp_path / "run" / runs.BEST)["model"]
    assert all(torch.equal(v, best_saved[k]) for k, v in best.model.state_dict().items())
    with pytest.raises(Exception, match="which"):
        load_run(tmp_path / "run", which="first")


def test_load_run_round_trips_a_trained_m2(tmp_path):
    """The loaded run predicts exactly what the trained one did, posterior and all."""
    from pyrossl.train import Trainer

    config = tiny_config(
        model="m2", **{"data.labels_per_class": 5, "train.epochs": 2, "options": {"z_dim": 4, "hidden": [32]}}
    )
    trainer = Trainer(config, tmp_path / "m2")
    trainer.fit()
    run = load_run(tmp_path / "m2", which="last")
    x, y = run.tensors("test")
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(run.predict(x), trainer.model.predict(x))
        expected = trainer.model.posterior(x)
    post = run.posterior(x)
    assert set(post) == {"y_probs", "z_loc", "z_scale"}
    for key in post:
        assert torch.equal(post[key], expected[key]), key
    assert torch.allclose(post["y_probs"].sum(-1), torch.ones(len(x)))
    assert (post["z_scale"] > 0).all() and post["z_loc"].shape == (len(x), 4)
    assert run.sample(3, y=2).shape == (3, 1, 8, 8)


MODELS = {
    "vae": ({}, {"z_loc", "z_scale"}),
    "m2": ({"data.labels_per_class": 5}, {"y_probs", "z_loc", "z_scale"}),
    "m1m2": (
        {"data.labels_per_class": 5, "options": {"z_dim": 4, "hidden": [32], "m1_z_dim": 3, "m1_hidden": [16]}},
        {"y_probs", "z_loc", "z_scale", "code_loc", "code_scale"},
    ),
    **{
        name: (
            {"data.labels_per_class": 5, "options": {"z_dim": 4, "a_dim": 3, "hidden": [32]}},
            {"y_probs", "a_loc", "a_scale", "z_loc", "z_scale"},
        )
        for name in ("adgm", "sdgm")
    },
    "classifier": ({"data.labels_per_class": 5, "options": {"hidden": [32]}}, {"y_probs"}),
    "gae": (
        {"data.labels_per_class": 20, "options": {"z_dim": 4, "hidden": [32], "components": 1, "n_init": 1}},
        {"z", "y_probs", "cluster_probs"},
    ),
    "gmm-vae": (
        {"train.epochs": 2, "options": {"z_dim": 3, "hidden": [32], "warmup_epochs": 1, "n_init": 1}},
        {"z_loc", "z_scale", "cluster_probs"},
    ),
    "serket-vae-gmm": (
        {
            "train.epochs": 2,
            "data.validation": 0,
            "data.test": 0,
            "options": {"z_dim": 3, "hidden": [32], "epochs_per_round": 1, "n_init": 1},
        },
        {"z_loc", "z_scale", "cluster_probs"},
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_describes_its_posterior_and_has_a_predictive(tmp_path, name):
    overrides, keys = MODELS[name]
    overrides = {"train.epochs": 1, **overrides}
    if "options" not in overrides:
        overrides["options"] = {"z_dim": 4, "hidden": [32]}
    train(tiny_config(model=name, **overrides), tmp_path / name)
    run = load_run(tmp_path / name)
    part = "test" if run.split.test.numel() else "train"
    x, _ = run.tensors(part)
    x = x[:5]
    post = run.posterior(x)
    assert set(post) == keys
    assert all(v.shape[0] == 5 and torch.isfinite(v).all() for v in post.values())
    for probs in ("y_probs", "cluster_probs"):
        if probs in post:
            assert torch.allclose(post[probs].sum(-1), torch.ones(5), atol=1e-5)
    if name != "vae":
        assert run.predict(x).shape == (5,)
    else:
        with pytest.raises(PyrosslError, match="predict"):
            run.predict(x)
    # the model's own arguments: the classifier's labels (None: drawn), Serket's message (the prior mean)
    args = {"classifier": (x, None), "serket-vae-gmm": (x, torch.zeros(5, 3))}.get(name, (x,))
    draws = run.predictive(num_samples=3)(*args)
    assert draws and all(v.shape[:2] == (3, 5) for v in draws.values())


def test_read_table_names_the_file_and_what_is_wrong(tmp_path):
    path = tmp_path / "z_learn.txt"
    path.write_text("1 2\n3 4\n")
    assert runs.read_table(path, shape=(2, 2)).tolist() == [[1, 2], [3, 4]]
    for content, message in [
        ("1 2\n3 x\n", "could not convert"),
        ("1 2\n3\n", "z_learn.txt"),
        ("", "a table of 0"),
        ("1 2\n3 nan\n", "not finite"),
    ]:
        path.write_text(content)
        with pytest.raises(CheckpointError, match=message):
            runs.read_table(path, shape=(2, 2))
    path.write_text("1 2 3\n4 5 6\n")
    with pytest.raises(CheckpointError, match="a table of 2 x 3 values, not 2 x 2"):
        runs.read_table(path, shape=(2, 2))
    with pytest.raises(CheckpointError, match="missing"):
        runs.read_table(tmp_path / "absent.txt")


def test_split_amount_takes_fractions_and_whole_counts_only():
    assert runs.split_amount("data.validation", 0.25) == 0.25
    assert runs.split_amount("data.validation", 20.0) == 20 and isinstance(runs.split_amount("v", 20.0), int)
    for bad in (1.5, -1, float("nan"), float("inf"), True):
        with pytest.raises(PyrosslError):
            runs.split_amount("data.validation", bad)


def test_prepare_output_makes_and_tests_the_folder(tmp_path):
    assert runs.prepare_output(tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="a file of that name exists"):
        runs.prepare_output(tmp_path / "file")
    with pytest.raises(CheckpointError, match="cannot write into"):
        runs.prepare_output(tmp_path / "file" / "below")


def test_a_checkpoint_with_nan_parameters_or_missing_keys_is_refused(tmp_path):
    runs.atomic_save({"model": {"w": torch.tensor([1.0, float("nan")])}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="parameter 'w' holds NaN"):
        runs.load_checkpoint(tmp_path / "c.pt")
    runs.atomic_save({"model": {"log_weights": torch.tensor([0.0, -float("inf")])}}, tmp_path / "ok.pt")
    runs.load_checkpoint(tmp_path / "ok.pt", keys=("model",))  # an empty component's log-weight is -inf
    with pytest.raises(CheckpointError, match="no 'optimizer'"):
        runs.load_checkpoint(tmp_path / "ok.pt", keys=("model", "optimizer"))
    runs.atomic_save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        runs.load_checkpoint(tmp_path / "list.pt")


def test_metrics_keep_a_torn_last_line_out_and_refuse_a_damaged_one(tmp_path):
    (tmp_path / runs.METRICS).write_text('{"epoch": 1, "loss": 2.0, "val_kl_per_unit": [0.1, 0.2]}\n{"epoch": 2, "lo')
    assert [r["epoch"] for r in runs.read_metrics(tmp_path)] == [1]
    (tmp_path / runs.METRICS).write_text('{"epoch": 1}\n{"loss": 2.0}\n')
    with pytest.raises(CheckpointError, match="line 2: not an epoch's record"):
        runs.read_metrics(tmp_path)


def test_loading_refuses_before_it_allocates_and_names_what_a_file_asks_for(tmp_path):
    """What torch.save never writes is refused from the archive's directory and a dry read of its pickle:
    a global it asks for (named), a compressed record, a storage larger than its record, a view larger
    than its storage; a checkpoint of another model names the tensors that differ."""
    import collections
    import os
    import time
    import zipfile

    class System:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"model": {}, "x": System()}, tmp_path / "system.pt")
    with pytest.raises(
        CheckpointError,
        match=r"not a safe pyrossl checkpoint \(refused to unpickle: it asks to import and call posix.system\)",
    ):
        runs.load_checkpoint(tmp_path / "system.pt")

    stored = tmp_path / "stored.pt"
    torch.save({"model": {"w": torch.zeros(1_000_000)}}, stored)
    with (
        zipfile.ZipFile(stored) as zin,
        zipfile.ZipFile(tmp_path / "deflated.pt", "w", compression=zipfile.ZIP_DEFLATED) as zout,
    ):
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        names = [i.filename for i in zin.infolist()]
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="is compressed; torch.save never compresses"):
        runs.load_checkpoint(tmp_path / "deflated.pt")
    assert time.perf_counter() - start < 0.5
    record = next(n for n in names if n.endswith("/data/0"))
    with zipfile.ZipFile(stored) as zin, zipfile.ZipFile(tmp_path / "short.pt", "w") as zout:
        for name in names:
            zout.writestr(name, zin.read(name)[:400] if name == record else zin.read(name))
    with pytest.raises(CheckpointError, match="storage 0 declares 4000000 bytes, its record holds 400"):
        runs.load_checkpoint(tmp_path / "short.pt")

    class HugeView:  # 10^12 elements over a storage of 100
        def __init__(self, storage):
            self.storage = storage

        def __reduce_ex__(self, protocol):
            return (
                torch._utils._rebuild_tensor_v2,
                (self.storage, 0, (10**6, 10**6), (10**6, 1), False, collections.OrderedDict()),
            )

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = torch.storage.TypedStorage(
            wrap_storage=torch.zeros(100).untyped_storage(), dtype=torch.float32, _internal=True
        )
    torch.save({"model": {"w": HugeView(storage)}}, tmp_path / "view.pt")
    with pytest.raises(
        CheckpointError,
        match=r"a tensor of shape \[1000000, 1000000\] views more elements than its storage 0 holds \(100\)",
    ):
        runs.load_checkpoint(tmp_path / "view.pt")

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    runs.atomic_save(
        {"model": {"0.weight": torch.zeros(5, 3), "0.bias": torch.zeros(4), "extra": torch.zeros(1)}},
        tmp_path / "other.pt",
    )
    with pytest.raises(
        CheckpointError,
        match=r"does not match this Sequential: 2 of this model's tensors missing \(first: 1.weight\); "
        r"1 it does not have \(first: extra\); 1 of another shape \(first: 0.weight, \[5, 3\] in the file, \[4, 3\] "
        r"here\)",
    ):
        runs.load_parameters(model, tmp_path / "other.pt")
