"""Helpers the tests share (``from common import tiny_config``); conftest.py keeps the fixtures."""

import math

import torch


def tiny_config(**overrides):
    """A VAE on sklearn's digits that trains in about a second (and draws no figures unless asked)."""
    from pyrossl.config import config_from_dict

    raw = {
        "model": "vae",
        "seed": 0,
        "data": {"name": "digits", "labels_per_class": 0, "validation": 0.1, "test": 0.2},
        # no figures unless a test asks for them ("train.figures": True): drawing them is most of a tiny run's time
        "train": {"epochs": 3, "batch_size": 128, "lr": 3e-3, "progress": False, "figures": False},
        "options": {"z_dim": 4, "hidden": [32]},
    }
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (raw.setdefault(section, {}) if section else raw)[name] = value
    if raw["model"] != "vae" and "options" not in overrides:
        raw["options"] = {}
    return config_from_dict(raw)


#: tiny settings of each zoo entry (with ``tiny_config``): trains in a second or two
ENTRIES = {
    "vae": {"options": {"z_dim": 4, "hidden": [32]}},
    "m2": {"data.labels_per_class": 5, "options": {"z_dim": 4, "hidden": [32]}},
    "m1m2": {
        "data.labels_per_class": 5,
        "options": {"z_dim": 4, "hidden": [32], "m1_z_dim": 3, "m1_hidden": [32], "m1_epochs": 2},
    },
    "adgm": {"data.labels_per_class": 5, "options": {"z_dim": 4, "a_dim": 3, "hidden": [32], "batch_norm": True}},
    "sdgm": {"data.labels_per_class": 5, "options": {"z_dim": 4, "a_dim": 3, "hidden": [32]}},
    "classifier": {"data.labels_per_class": 5, "options": {"hidden": [32]}},
    "gae": {"data.labels_per_class": 20, "options": {"z_dim": 4, "hidden": [32], "components": 1, "n_init": 1}},
    "gmm-vae": {"train.epochs": 2, "options": {"z_dim": 3, "hidden": [32], "warmup_epochs": 1, "n_init": 1}},
    "serket-vae-gmm": {"train.epochs": 2, "options": {"z_dim": 3, "hidden": [32], "epochs_per_round": 1, "n_init": 1}},
    "ccvae": {"data.labels_per_class": None, "options": {"z_style": 2, "hidden": [32], "k": 2}},
    "ccvae-attributes": {
        "model": "ccvae",
        "data.name": "shapes",
        "data.num_examples": 200,
        "data.labels_per_class": None,
        "options": {"z_style": 2, "hidden": [32], "k": 2},
    },
}


#: the entries and the guide variants whose Pyro contract is checked (model, guide, elbo)
CONTRACT = {
    **ENTRIES,
    "gmm-vae": {"options": {"z_dim": 3, "hidden": [32], "warmup_epochs": 0, "n_init": 1}},
    "m2-dirichlet": {"model": "m2", "guide": "dirichlet", **ENTRIES["m2"]},
    "m2-gumbel-flow": {"model": "m2", "guide": "gumbel", "z_guide": "flow", **ENTRIES["m2"]},
    "m1m2-mean-joint": {
        "model": "m1m2",
        **ENTRIES["m1m2"],
        "options": {**ENTRIES["m1m2"]["options"], "codes": "mean", "m1_training": "joint"},
    },
    "sdgm-flow": {"model": "sdgm", "z_guide": "flow", **ENTRIES["sdgm"]},
}


def entry_and_batches(name, **extra):
    """A zoo entry built as the trainer builds it, and the batches it trains on, as argument tuples
    of its model and guide: ``(x,)`` unlabelled, ``(x, y)`` labelled, Serket's ``(x, messages)``."""
    from pyrossl import runs
    from pyrossl.registry import build_model

    settings = {"model": name, **CONTRACT[name], **extra}
    config = tiny_config(**settings)
    dataset = runs.load_dataset_for(config)
    entry = build_model(config, dataset.meta())
    x, y = dataset.x[:12], dataset.y[:12]
    if entry.wants_index:
        return entry, [(x, entry.prior_loc(entry.assignment[:12]))]
    batches = [(x,)] if entry.uses_unlabelled else []
    if entry.uses_labels:
        batches.append((x[:6], y[:6]))
    return entry, batches


def trainer_loss(entry, args):
    """What the trainer's loss (``entry.forward``) is on one batch, summed over its examples."""
    if entry.wants_index:
        return entry(args[0], index=torch.arange(args[0].shape[0])) * args[0].shape[0]
    if len(args) == 1:
        return entry(args[0]) * args[0].shape[0]
    return entry(None, *args) * args[0].shape[0]


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


def enumerated_and_by_hand(entry, x, draws=1500, chunks=50):
    """The unlabelled bound U(x) of an enumerating entry two ways, each averaged over ``draws`` independent
    draws: ``TraceEnum_ELBO``'s loss and the entry's per-image ``elbo_estimate`` (the sum over classes
    written out). ``x`` is repeated so each call scores ``draws / chunks`` draws at once (one Pyro call per
    chunk, not per draw). Returns both means of the summed bound over ``x`` and the standard error of their
    difference."""
    per_chunk = draws // chunks
    batch = x.repeat(per_chunk, *[1] * (x.dim() - 1))
    with torch.no_grad():
        # each chunk's loss sums per_chunk independent draws of the bound over x
        totals = torch.tensor([-entry.elbo.unlabelled.loss(entry.model, entry.guide, batch) for _ in range(chunks)])
        by_hand = torch.cat([entry.elbo_estimate(batch, batch_size=len(batch)) for _ in range(chunks)])
    by_hand = by_hand.reshape(-1, len(x)).sum(-1)  # one value per draw
    enumerated = totals / per_chunk
    se = math.hypot(totals.std().item() / math.sqrt(per_chunk), by_hand.std().item()) / math.sqrt(chunks * per_chunk)
    return enumerated.mean().item(), by_hand.mean().item(), se
