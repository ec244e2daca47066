"""The CLI's promise under input nobody wrote a test for: exit 0, or exit 2 with one line, never a traceback.

Two fuzzers (hypothesis):

- **recipes**: each real recipe of ``runs/`` shrunk to tiny data (a few dozen images, one or two
  epochs), then mutated: keys removed, values of the wrong type, out-of-range and non-finite
  numbers, unknown keys and sections; ``pyrossl train`` on the result;
- **run directories**: finished tiny runs (``m2``, ``serket-vae-gmm`` with its text files, and an
  ablation folder) copied, one file damaged (deleted, truncated, bytes overwritten, replaced by text),
  then ``pyrossl eval``, ``report``, ``train --resume`` or ``ablate`` on the copy. Besides the exit
  code: a command that fails leaves every file of the run byte-identical to what it found (figures
  aside, which ``report`` exists to redraw), and one that succeeds leaves a run that loads.

Each test runs a bounded number of cases, the same ones every time (``derandomize``);
``PYROSSL_FUZZ=N`` runs N fresh random cases per test instead (the long profile).
"""

from __future__ import annotations

import math
import os
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from pyrossl import cli, runs
from pyrossl.run import load_run

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "runs").glob("*.toml"))
LONG = int(os.environ.get("PYROSSL_FUZZ", "0"))


def fuzz_settings(examples: int):
    # no shrinking in the suite's profile: a case costs seconds, and a failure prints its inputs anyway
    phases = list(Phase) if LONG else [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(
        max_examples=LONG or examples,
        deadline=None,
        derandomize=not LONG,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=phases,
    )


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------
def tiny(recipe: dict) -> dict:
    """The recipe on a few dozen images for one or two epochs; everything else as written."""
    r = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe.items()}
    data, train, options = r.setdefault("data", {}), r.setdefault("train", {}), r.setdefault("options", {})
    name = data.get("name", "digits")
    if name in ("celeba", "shapes"):
        for key in ("attributes", "max_per_part", "image_size", "label_fraction"):
            data.pop(key, None)
        data.update(name="shapes", num_examples=150, validation=20)
    else:
        data.update(name="digits" if name == "digits" else "mnist5k", limit_per_class=12, validation=20)
        data.pop("data_dir", None)
        if data.get("labels_per_class"):
            data["labels_per_class"] = 2
    if "test" in data or name == "digits":
        data["test"] = 20
    train.update(epochs=2, batch_size=32, eval_every=1, checkpoint_every=1)
    if "labelled_batch_size" in train:
        train["labelled_batch_size"] = 10
    if "iwae_samples" in train:
        train["iwae_samples"] = 3
    for key, small in (("epochs_per_round", 1), ("warmup_epochs", 1), ("components", 2), ("k", 5), ("n_init", 1)):
        if key in options:
            options[key] = small
    if "hidden" in options:
        options["hidden"] = [16]
    return r


def toml_text(recipe: dict) -> str:
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(v)

    top = [f"{k} = {value(v)}" for k, v in recipe.items() if not isinstance(v, dict)]
    sections = [
        f"[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
        for k, v in recipe.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


#: values a user could type by mistake: wrong types, edges, out of range, not finite (never a huge
#: count: a valid one would train for ever)
ODD = [
    -1,
    0,
    1,
    2,
    0.5,
    1.5,
    -0.5,
    1e30,
    -1e30,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x",
    "none",
    True,
    False,
    [],
    [0],
    [-1],
    [2.5],
    {},
    {"a": 1},
]
#: keys that keep the data tiny: mutated, never removed
KEEP = {("data", "limit_per_class"), ("data", "num_examples"), ("data", "name")}


def leaves(recipe: dict) -> list[tuple[str, ...]]:
    out = []
    for k, v in recipe.items():
        if isinstance(v, dict):
            out += [(k, kk) for kk in v]
        else:
            out.append((k,))
    return out


@st.composite
def mutated_recipes(draw):
    path = draw(st.sampled_from(RECIPES))
    recipe = tiny(tomllib.loads(path.read_text()))
    for _ in range(draw(st.integers(1, 3))):
        keys = leaves(recipe)
        kind = draw(st.sampled_from(["remove", "nudge", "nudge", "odd", "odd", "unknown"]))
        if kind == "unknown":
            where = draw(st.sampled_from(["top", "data", "train", "options", "section"]))
            name = draw(st.sampled_from(["epoch", "lr_decay", "hiden", "zz"]))
            if where == "top":
                recipe[name] = 1
            elif where == "section":
                recipe["extra"] = {name: 1}
            else:
                recipe.setdefault(where, {})[name] = 1
            continue
        key = draw(st.sampled_from(keys))
        node = recipe
        for part in key[:-1]:
            node = node[part]
        value = node[key[-1]]
        if kind == "remove" and key not in KEEP:
            del node[key[-1]]
        elif kind == "nudge" and isinstance(value, (int, float)) and not isinstance(value, bool):
            # a plausible value near the written one: the edges a valid recipe can reach (0, 1, halves, doubles)
            node[key[-1]] = draw(
                st.sampled_from([0, 1, 2, value * 2, value + 1, value // 2 if isinstance(value, int) else value / 2])
            )
        else:
            node[key[-1]] = draw(st.sampled_from(ODD))
    return path.name, recipe


def run_cli(argv, capsys) -> tuple[int, str]:
    threads = torch.get_num_threads()
    try:
        code = cli.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)  # a recipe's `threads` must not leak into the rest of the suite
    return code, capsys.readouterr().err


def assert_promise(code: int, err: str, what: str) -> None:
    assert code in (0, 2), f"{what}: exit {code}\n{err}"
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pyrossl: error: "), f"{what}: not one line:\n{err}"


@fuzz_settings(24)
@given(case=mutated_recipes())
def test_mutated_recipes_train_or_exit_2_with_one_line(case, tmp_path_factory, capsys):
    name, recipe = case
    folder = tmp_path_factory.mktemp("recipe")
    (folder / "r.toml").write_text(toml_text(recipe))
    code, err = run_cli(["train", folder / "r.toml", "--out", folder / "run", "--quiet"], capsys)
    assert_promise(code, err, f"{name} mutated to\n{toml_text(recipe)}")
    event(f"exit {code}" + (f": {err.strip()[16:70]}" if os.environ.get("PYROSSL_FUZZ_MESSAGES") else ""))
    if code == 0:  # what trained can be read back by every command
        assert load_run(folder / "run").summary["epochs"] >= 1


def test_the_tiny_recipes_train(tmp_path, capsys):
    """The fuzzer's starting points are valid: its mutations, not the shrinking, cause the exits 2."""
    for path in RECIPES:
        if path.stem not in (
            "m2-fmnist-100",
            "gae-fmnist",
            "ccvae-shapes",
            "serket-vae-gmm-mnist3000",
            "gmm-vae-mnist3000",
            "vae-digits",
        ):
            continue
        (tmp_path / f"{path.stem}.toml").write_text(toml_text(tiny(tomllib.loads(path.read_text()))))
        code, err = run_cli(["train", tmp_path / f"{path.stem}.toml", "--out", tmp_path / path.stem, "--quiet"], capsys)
        assert code == 0, f"{path.name}: {err}"


# ---------------------------------------------------------------------------------------------
# run directories
# ---------------------------------------------------------------------------------------------
SMALL = {
    "m2": [
        'model="m2"',
        'guide="enum"',
        'data.name="digits"',
        "data.limit_per_class=15",
        "data.labels_per_class=2",
        "data.validation=20",
        "data.test=20",
        "train.epochs=2",
        "train.batch_size=32",
        "options.hidden=[16]",
        "options.z_dim=4",
    ],
    "serket": [
        'model="serket-vae-gmm"',
        'data.name="digits"',
        "data.limit_per_class=15",
        "data.labels_per_class=0",
        "data.validation=0",
        "data.test=0",
        "train.epochs=2",
        "train.batch_size=50",
        "options.hidden=[16]",
        "options.z_dim=3",
        "options.epochs_per_round=1",
        "options.clusters=3",
        "train.eval_every=1",
    ],
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Finished tiny runs (and an ablation of two guides), trained once for the module."""
    base = tmp_path_factory.mktemp("finished")
    recipe = base / "empty.toml"
    recipe.write_text("")
    for name, overrides in SMALL.items():
        argv = ["train", recipe, "--out", base / name, "--quiet"] + [a for o in overrides for a in ("--set", o)]
        assert cli.main([str(a) for a in argv]) == 0
    ablate = ["ablate", recipe, "--guides", "enum,gumbel", "--out", base / "ablation"] + [
        a for o in SMALL["m2"] for a in ("--set", o)
    ]
    assert cli.main([str(a) for a in ablate]) == 0
    assert runs.is_run(base / "ablation" / "guide-enum-seed0")  # the run the commands below are pointed at
    return base, recipe


def snapshot(folder: Path) -> dict[str, bytes]:
    # (a run's lock names whoever held it last: not the run's content)
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != runs.LOCK
    }


DAMAGES = ["delete", "truncate", "overwrite", "text", "empty"]


def damage(path: Path, how: str, where: float, data: bytes) -> None:
    content = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(content[: int(len(content) * where)])
    elif how == "overwrite":
        at = int(len(content) * where)
        path.write_bytes(content[:at] + data + content[at + len(data) :])
    elif how == "text":
        path.write_text("not what was written here\n")
    else:
        path.write_bytes(b"")


@fuzz_settings(24)
@given(
    which=st.sampled_from(["m2", "serket", "ablation"]),
    pick=st.floats(0, 1, exclude_max=True),
    how=st.sampled_from(DAMAGES),
    where=st.floats(0, 1),
    data=st.binary(min_size=1, max_size=16),
    command=st.sampled_from(["eval", "report", "resume", "ablate"]),
)
def test_damaged_run_directories_exit_2_with_one_line_and_are_not_made_worse(
    finished, which, pick, how, where, data, command, tmp_path_factory, capsys
):
    base, recipe = finished
    work = tmp_path_factory.mktemp("damaged")
    shutil.copytree(base / which, work / which)
    root = work / which
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".png"))
    target = files[int(pick * len(files))]
    damage(target, how, where, data)
    before = snapshot(root)
    run_dir = root / "guide-enum-seed0" if which == "ablation" else root
    if which == "ablation" and command != "eval":  # an ablation folder is read by ablate itself
        command = "ablate"
    elif command == "ablate":
        command = "resume"
    if command == "eval":
        argv = ["eval", run_dir]
    elif command == "report":
        argv = ["report", run_dir]
    elif command == "resume":
        argv = ["train", "--resume", run_dir, "--quiet"]
    else:
        argv = ["ablate", recipe, "--guides", "enum,gumbel", "--out", root] + [
            a for o in SMALL["m2"] for a in ("--set", o)
        ]
    code, err = run_cli(argv, capsys)
    what = f"{command} after {how} of {target.relative_to(work)} (at {where:.2f}, {data!r})"
    assert_promise(code, err, what)
    event(f"{command}: exit {code}")
    after = snapshot(root)
    changed = [
        k
        for k in set(before) | set(after)
        if before.get(k) != after.get(k) and "figures" not in Path(k).parts and not k.startswith("ablation.")
    ]
    if code == 2 or command == "eval":
        assert not changed, f"{what}: exit {code} but changed {changed}"
    elif changed:  # it rewrote the run (a resume finishing it again): then the run is whole
        load_run(run_dir)
