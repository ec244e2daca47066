"""Command line: ``pyrossl train|eval|ablate|report|list|data``.

Exit codes: 0 on success, 2 on bad input (one line on stderr, no traceback), 1 on an internal error,
130 on Ctrl-C (SIGINT) and 143 on SIGTERM (one line, with the resume command when a run exists).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from pathlib import Path

from pyrossl import distributed
from pyrossl.errors import Interrupted, ProcessLost, PyrosslError, TrainingInterrupted, interrupted_by, signal_of
from pyrossl.infer.params import module_local
from pyrossl.plugins import load_plugins


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit code 2, like every other bad input."""

    def error(self, message):
        raise PyrosslError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyrossl", description="A Pyro model zoo of deep generative classifiers.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a recipe into a run directory")
    t.add_argument("recipe", nargs="?", help="TOML recipe (runs/*.toml); optional with --resume")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=5 --set guide=enum",
    )
    t.add_argument("--out", help="run directory (default: outputs/<recipe>-seed<seed>)")
    t.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the stopped run in DIR; with --set train.epochs=N (more than it has) extend it",
    )
    t.add_argument("--device", help="auto | cpu | cuda (overrides the recipe)")
    t.add_argument("--seed", type=int, help="random seed (overrides the recipe)")
    t.add_argument("--threads", type=int, help="CPU threads for torch")
    t.add_argument("--data-dir", help="folder holding the dataset's files (sets data.data_dir)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N processes of this machine (data-parallel, torchrun); train.batch_size stays the global batch",
    )

    e = sub.add_parser("eval", help="evaluate a run directory on its test set")
    e.add_argument("run", help="run directory")
    e.add_argument("--which", choices=["best", "last"], default="best")
    e.add_argument("--iwae", type=int, default=0, metavar="K", help="also estimate log p(x) with K importance samples")
    e.add_argument("--device", default="cpu")

    a = sub.add_parser(
        "ablate", help="train a recipe over guides, z-guides, config values and seeds; write a table and a figure"
    )
    a.add_argument("recipe", help="TOML recipe")
    a.add_argument("--guides", default="", help="comma-separated guides, e.g. enum,gumbel")
    a.add_argument("--z-guides", default="", help="comma-separated guides of the code z, e.g. diag-normal,flow")
    a.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a config key and its values, e.g. options.aux_weight=1,5 (repeatable: all combinations)",
    )
    a.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    a.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override for every run"
    )
    a.add_argument("--out", help="folder of the runs and summaries (default: outputs/ablate-<recipe>)")
    a.add_argument("--device", help="auto | cpu | cuda")
    a.add_argument(
        "--iwae",
        type=int,
        default=100,
        metavar="K",
        help="importance samples of the held-out IWAE bound beside the guide's ELBO (default 100; 0: off)",
    )
    a.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="train N cells at a time, each in its own process (default 1)"
    )
    a.add_argument(
        "--commands", action="store_true", help="print each cell's `pyrossl train` line (a job array's), train nothing"
    )
    a.add_argument("--collect", action="store_true", help="train nothing: write the tables of cells trained elsewhere")

    r = sub.add_parser("report", help="redraw a run's figures from its checkpoint and write figures/index.html")
    r.add_argument("run", help="run directory")
    r.add_argument("--which", choices=["best", "last"], default="best")
    r.add_argument("--device", default="cpu")

    sub.add_parser("list", help="models, their guides, and datasets")

    d = sub.add_parser("data", help="datasets: download or inspect")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    dl = dsub.add_parser("download", help="fetch a dataset's official files into the cache and check their MD5 sums")
    dl.add_argument("name", choices=["mnist", "fashion-mnist"])
    dl.add_argument("--dest", help="folder (default: the user cache)")
    dl.add_argument("--base-url", help="a mirror of the official files")
    info = dsub.add_parser("info", help="load a dataset and print its size, shape and classes")
    info.add_argument("name")
    info.add_argument("--data-dir")
    info.add_argument("--path", help="the .npz file, for the npz dataset")
    for command in [t, e, a, r, sub.choices["list"], dl, info]:
        command.add_argument(
            "--plugin",
            action="append",
            default=[],
            metavar="MODULE_OR_FILE",
            help="import a module or .py file that registers entries or guides (repeatable; "
            "train and ablate record it in the run)",
        )
    return p


def cmd_train(args) -> int:
    from pyrossl import runs
    from pyrossl.config import load_config
    from pyrossl.train import train, tune_allocator

    overrides = list(args.overrides)
    for flag in ("device", "seed", "threads"):
        if getattr(args, flag) is not None:
            overrides.append(f"{flag}={getattr(args, flag)!r}" if flag == "device" else f"{flag}={getattr(args, flag)}")
    if args.quiet:
        overrides.append("train.progress=false")
    if args.data_dir:
        overrides.append(f"data.data_dir={json.dumps(args.data_dir)}")
    if args.resume:
        out = Path(args.resume)
        if not runs.is_run(out):
            raise PyrosslError(f"cannot resume: {out} is not a run directory (no {runs.CONFIG})")
        config = load_config(args.recipe or out / runs.CONFIG, overrides)
    else:
        if not args.recipe:
            raise PyrosslError("train needs a recipe (or --resume DIR)")
        config = load_config(args.recipe, overrides)
        out = Path(args.out) if args.out else Path("outputs") / f"{Path(args.recipe).stem}-seed{config.seed}"
    if args.plugin:  # recorded with the run, so that every later command finds them
        config = dataclasses.replace(config, plugins=[*config.plugins, *args.plugin])
    if args.nproc is not None:
        return launch_processes(args, config, out)
    tune_allocator()  # this process only trains: keep each step's memory for the next
    try:
        summary = train(config, out, resume=bool(args.resume))
    except KeyboardInterrupt as exc:  # a second Ctrl-C, or a signal outside the training loop
        if (
            not runs.is_run(out) or distributed.environment().active
        ):  # nothing to resume yet; a job: its launcher says it
            raise
        kept = (
            f"the last checkpoint {out / runs.CHECKPOINT} is intact"
            if (out / runs.CHECKPOINT).exists()
            else "no checkpoint was written yet"
        )
        raise TrainingInterrupted.by(signal_of(exc), f"; {kept}: resume with: pyrossl train --resume {out}") from None
    if distributed.environment().rank == 0:  # one summary per job, not one per process
        print(format_summary(summary))
        print(f"run directory: {out}")
    return 0


#: set in the processes ``pyrossl train --nproc N`` starts: the launcher reports a failed process itself
LAUNCHED = "PYROSSL_LAUNCHED_BY_NPROC"


def first_cause(failures: dict) -> tuple:
    """The (rank, failure) that stopped a torchrun job, from its ``ChildFailedError.failures``.

    torchrun records the processes it finds failed first, then stops the rest (SIGTERM) and records
    those too, in the same dict after them. Timestamps are whole seconds, so a process killed and the
    one stopped because of it often share one: the order of capture breaks the tie (a stable sort),
    never the rank. A process that died by a signal is preferred to one that exited with a code,
    since a survivor exits with a code once it notices its peer is gone.
    """
    captured = sorted(failures.items(), key=lambda item: item[1].timestamp)  # stable: capture order within a second
    killed = [item for item in captured if item[1].exitcode < 0]
    return (killed or captured)[0]


def launch_processes(args, config, out: Path) -> int:
    """``pyrossl train --nproc N ...``: the same command on N processes of this machine, started by torchrun."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from pyrossl.train import Trainer

    if args.nproc < 1:
        raise PyrosslError(f"--nproc must be at least 1, not {args.nproc}")
    if distributed.environment().active:
        raise PyrosslError("--nproc starts the processes itself: leave it out under torchrun or srun")
    # bad input fails here, once, before any process starts; the lock is the job's rank 0's to take
    Trainer(config, out, resume=bool(args.resume)).release()
    child, tokens = [], iter(args.argv)
    for token in tokens:  # the same command without --nproc N (or --nproc=N)
        if token == "--nproc":
            next(tokens, None)
        elif not token.startswith("--nproc="):
            child.append(token)
    if not args.out and not args.resume:
        child += ["--out", str(out)]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))  # the cores, shared
    os.environ[LAUNCHED] = "1"  # the processes leave the job's one line to this launcher
    launcher = get_args_parser().parse_args(
        ["--standalone", "--nnodes", "1", "--nproc-per-node", str(args.nproc), "--module", "pyrossl", *child]
    )
    try:
        run(launcher)
    except SignalException as exc:  # Ctrl-C or SIGTERM to the launcher: torchrun has stopped every process
        print(
            f"pyrossl: interrupted by {exc.sigval.name}; every process was stopped and the last checkpoint is intact: "
            f"resume with pyrossl train --resume {out} --nproc {args.nproc}",
            file=sys.stderr,
        )
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = first_cause(exc.failures)
        if failure.exitcode == 2:  # bad input: rank 0 has said why
            return 2
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(
            f"pyrossl: error: process {rank} of {args.nproc} failed ({how}); the others were stopped and the last "
            f"checkpoint is intact: resume with pyrossl train --resume {out} --nproc {args.nproc}",
            file=sys.stderr,
        )
        return 1
    return 0


def format_summary(summary: dict) -> str:
    """A small Markdown table of the best and last epochs' test metrics."""
    best, last = summary["best"], summary["last"]
    keys = [k for k in best if k.startswith(("train_", "test_")) and isinstance(best[k], (int, float))]
    lines = [
        f"{summary['model']} / {summary['guide']} on {summary['dataset']} (seed {summary['seed']}): "
        f"{summary['epochs']} epochs in {summary['seconds']:.1f} s, best epoch {summary['best_epoch']} by "
        f"{summary['selection_metric']}",
        "",
        "| metric | best epoch | last epoch |",
        "|---|---|---|",
    ]
    for k in keys:
        lines.append(f"| {k} | {best[k]:.4f} | {last.get(k, float('nan')):.4f} |")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from pyrossl.run import load_run

    if args.iwae < 0:
        raise PyrosslError(f"--iwae must be 0 (off) or a positive number of samples, not {args.iwae}")
    run = load_run(args.run, which=args.which, device=args.device)
    part = "test" if run.split.test.numel() or not run.model.evaluate_on_train else "train"
    x, y = run.tensors(part)
    if not x.shape[0]:
        raise PyrosslError(f"run {run.path} has no {part} examples to evaluate")
    metrics = {f"{part}_{k}": v for k, v in run.model.evaluate(x, y, run.config.train.eval_batch_size).items()}
    if args.iwae:
        from pyrossl.train import check_iwae_memory

        check_iwae_memory(args.iwae, x.shape[0], x[0].numel(), x.device, "--iwae")
        try:
            metrics[f"{part}_log_likelihood"] = run.model.log_likelihood(x, args.iwae).mean().item()
        except NotImplementedError:
            raise PyrosslError(f"model '{run.config.model}' has no likelihood estimate (drop --iwae)") from None
    print(json.dumps({"run": str(run.path), "which": args.which, **metrics}, indent=2))
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise PyrosslError(f"{flag} takes comma-separated integers, not {text!r}") from None


def cmd_ablate(args) -> int:
    from pyrossl.ablate import ablate
    from pyrossl.train import tune_allocator

    tune_allocator()  # this process only trains (see pyrossl train)

    guides = [g.strip() for g in args.guides.split(",") if g.strip()]
    z_guides = [g.strip() for g in args.z_guides.split(",") if g.strip()]
    if not guides and not z_guides and not args.vary:
        raise PyrosslError("ablate needs --guides, --z-guides or --vary (what to compare)")
    out = Path(args.out) if args.out else Path("outputs") / f"ablate-{Path(args.recipe).stem}"
    overrides = list(args.overrides)
    if args.plugin:  # every run records them, with the recipe's own
        from pyrossl.config import read_recipe

        plugins = [*read_recipe(args.recipe).get("plugins", []), *args.plugin]
        overrides.append("plugins=[" + ", ".join(json.dumps(str(p)) for p in plugins) + "]")
    result = ablate(
        args.recipe,
        out,
        guides=guides,
        seeds=_int_list(args.seeds, "--seeds"),
        vary=args.vary,
        overrides=overrides,
        device=args.device,
        z_guides=z_guides,
        iwae=args.iwae,
        jobs=args.jobs,
        collect=args.collect,
        commands=args.commands,
    )
    if args.commands:
        print("\n".join(result["commands"]))
        return 0
    print(result["table"])
    written = [
        result["csv"],
        result["markdown"],
        result["figure"],
        *([result["elbo_figure"]] if "elbo_figure" in result else []),
    ]
    print(f"\nwrote {', '.join(map(str, written))}")
    return 0


def cmd_report(args) -> int:
    from pyrossl.report import write_report

    index, figures = write_report(args.run, which=args.which, device=args.device)
    print(f"{len(figures)} figures and {index}")
    return 0


def cmd_list(args) -> int:
    from pyrossl.data import dataset_names
    from pyrossl.registry import MODELS

    print("models (guides, z-guides of the code z; * = default):")
    for name, cls in MODELS.items():
        guides = ", ".join(g + ("*" if g == cls.default_guide else "") for g in cls.guides)
        print(f"  {name:10s} {cls.description}\n  {'':10s} guides: {guides}")
        if cls.z_guides:
            default = next(iter(cls.z_guides))
            print(f"  {'':10s} z-guides: {', '.join(g + ('*' if g == default else '') for g in cls.z_guides)}")
    print("datasets:")
    print("  " + ", ".join(dataset_names()))
    return 0


def cmd_data(args) -> int:
    from pyrossl.data import download, load_dataset

    if args.data_command == "download":
        path = download(args.name, dest=args.dest, base_url=args.base_url)
        print(f"{args.name}: files in {path}")
        return 0
    options = {"path": args.path} if args.path else {}
    ds = load_dataset(args.name, data_dir=args.data_dir, **options)
    test = 0 if ds.test_index is None else ds.test_index.numel()
    names = ds.attributes if ds.multilabel else ds.classes
    print(
        f"{ds.name}: {len(ds)} images of shape {tuple(ds.image_shape)} ({test} official test), "
        f"{ds.num_classes} {'attributes' if ds.multilabel else 'classes'}: {', '.join(map(str, names))}; from "
        f"{ds.source}"
    )
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "ablate": cmd_ablate,
    "report": cmd_report,
    "list": cmd_list,
    "data": cmd_data,
}


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM ends a command as Ctrl-C does (one line, 143), wherever it arrives: setup, a write, the
    # report; the training loop takes both over to stop at a step's end. A process of a job keeps the
    # default: its launcher stops it with SIGTERM and speaks for the job.
    sigterm = None
    if threading.current_thread() is threading.main_thread() and not distributed.environment().active:
        sigterm = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = _parser().parse_args(argv)
        args.argv = argv
        with module_local():  # the zoo's parameters stay in their modules, Pyro's param store untouched
            load_plugins(getattr(args, "plugin", None) or ())
        return COMMANDS[args.command](args)
    except TrainingInterrupted as exc:
        print(f"pyrossl: {exc}", file=sys.stderr)
        return exc.exit_code
    except (
        ProcessLost
    ) as exc:  # each surviving process says which one it is, unless --nproc's launcher speaks for the job
        if not os.environ.get(LAUNCHED):
            print(f"pyrossl: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except PyrosslError as exc:
        if distributed.environment().rank == 0:  # every process has the same input: one of them says what is wrong
            print(f"pyrossl: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if distributed.environment().rank == 0:  # Ctrl-C reaches every process of a job: one of them says so
            print(f"pyrossl: {interrupted_by(signal_of(exc))}", file=sys.stderr)
        return 128 + signal_of(exc)
    except OSError as exc:
        if exc.filename is None:  # not about a file the user named or can fix: a bug, with its traceback
            raise
        # a file or folder the command was pointed at (a permission, a full disk, a vanished folder)
        if distributed.environment().rank == 0:
            print(f"pyrossl: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        # an allocation too large for this machine (sizes in the recipe): say so; any other RuntimeError is a bug
        import torch

        if not (isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(exc)):
            raise
        print(
            "pyrossl: error: out of memory: lower train.batch_size, train.eval_batch_size or the network's sizes",
            file=sys.stderr,
        )
        return 2
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


def one_line(message: str, limit: int = 1500) -> str:
    """``message`` on one line and at most about ``limit`` characters: a value echoed from the input (a
    50 MB string, a 3,000-deep array) is cut in its middle, the start and the advice at the end kept."""
    message = " ".join(message.splitlines())
    if len(message) <= limit:
        return message
    cut = len(message) - limit
    return f"{message[: limit * 2 // 3]} [... {cut} characters ...] {message[-(limit // 3) :]}"


def console() -> int:
    """The ``pyrossl`` command (and ``python -m pyrossl``): :func:`main`, and a process of a
    multi-process job ends at once (:func:`pyrossl.distributed.end_process`)."""
    return distributed.end_process(main())


if __name__ == "__main__":
    sys.exit(console())
