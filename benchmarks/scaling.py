"""Data-parallel scaling: training throughput of one epoch on 1 and more processes.

    python benchmarks/scaling.py                      # M2 on Fashion-MNIST, 1 and 2 CPU processes, 1 thread each
    python benchmarks/scaling.py --nprocs 1,2,4 --device cuda     # one GPU per process, where there are GPUs

Each configuration trains the recipe for one epoch in a fresh run directory (``pyrossl train
--nproc N``, torchrun underneath) and reads the epoch's training time from ``metrics.jsonl`` (steps
only: no evaluation, no data loading). Throughput is training images per second (M2: the unlabelled
images, each step also sees a labelled batch); the scaling efficiency of N processes is their
throughput over N times that of one process. The global batch is the recipe's in every
configuration, so each process computes 1/N of every step.

Every configuration runs ``--repeats`` times, in alternating rounds (1, 2, 1, 2, ...), and its median
epoch counts: one epoch on a shared two-core machine varies by 10-15 % from run to run.

The ceiling column runs N independent one-process trainings at the same time, each with a 1/N share
of the batch: the same computation without any communication. On a machine whose cores share
resources (two vCPUs of one physical core, memory bandwidth) it is below 1, and no data-parallel
engine can beat it; the gap between the two columns is what communication and synchronisation cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from pyrossl import runs
from pyrossl.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _one_epoch_command(recipe: str, out: Path, device: str, threads: int, overrides: list[str]) -> list[str]:
    """``pyrossl train`` for one epoch of ``recipe`` into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    return [
        sys.executable,
        "-m",
        "pyrossl",
        "train",
        recipe,
        "--out",
        str(out),
        "--quiet",
        "--device",
        device,
        "--set",
        "train.epochs=1",
        "--set",
        "train.figures=false",  # the runs are timed, not looked at
        "--threads",
        str(threads),
        *[a for o in overrides for a in ("--set", o)],
    ]


def _epoch_of(out: Path) -> tuple[int, float, dict]:
    """Training images, seconds of the epoch's steps, and the summary of a finished one-epoch run."""
    summary = runs.read_summary(out)
    return (
        summary["split"]["unlabelled"] or summary["split"]["labelled"],
        runs.read_metrics(out)[0]["train_seconds"],
        summary,
    )


def one_epoch(recipe: str, nproc: int, device: str, threads: int, overrides: list[str], out: Path) -> dict:
    command = _one_epoch_command(recipe, out, device, threads, overrides)
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    images, seconds, summary = _epoch_of(out)
    return {
        "processes": nproc,
        "device": device,
        "threads_per_process": threads,
        "epoch_seconds": seconds,
        "images": images,
        "images_per_second": images / seconds,
        "steps": summary["steps"],
        "test_accuracy": summary.get("test_accuracy"),
    }


def independent_epochs(recipe: str, nproc: int, device: str, threads: int, overrides: list[str], out: Path) -> dict:
    """The machine's own ceiling for ``nproc`` processes: as many independent one-process runs at the
    same time, each with a 1/N share of the batch (the work of one data-parallel process per step, no
    communication). Their summed throughput over N times one process's is the efficiency the hardware
    allows (cores that share caches, memory bandwidth or a physical core give less than N times)."""
    config = load_config(recipe, overrides)
    share = [f"train.batch_size={max(1, config.train.batch_size // nproc)}"]
    if config.train.labelled_batch_size:
        share.append(f"train.labelled_batch_size={max(1, config.train.labelled_batch_size // nproc)}")
    jobs = []
    for i in range(nproc):
        folder = out / f"alone-{i}"
        command = _one_epoch_command(recipe, folder, device, threads, [*overrides, *share])
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            **({"CUDA_VISIBLE_DEVICES": str(i)} if device == "cuda" else {}),
        }
        jobs.append(
            (
                folder,
                subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT),
            )
        )
    throughput = 0.0
    for folder, job in jobs:
        _, err = job.communicate()
        if job.returncode != 0:
            raise RuntimeError(f"independent run {folder} failed:\n{err[-2000:]}")
        images, seconds, _ = _epoch_of(folder)
        throughput += images / seconds
    return {"processes": nproc, "images_per_second": throughput}


def table(rows: list[dict]) -> str:
    lines = [
        "| processes | device | threads each | epoch (s) | images/s | scaling efficiency | ceiling (independent runs) "
        "|",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ceiling = f"{r['ceiling_efficiency']:.2f}" if "ceiling_efficiency" in r else "—"
        lines.append(
            f"| {r['processes']} | {r['device']} | {r['threads_per_process']} | {r['epoch_seconds']:.1f} | "
            f"{r['images_per_second']:.0f} | {r['efficiency']:.2f} | {ceiling} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "runs" / "m2-fmnist-100.toml"))
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--no-ceiling",
        dest="ceiling",
        action="store_false",
        help="skip the independent runs that measure what the hardware allows",
    )
    parser.add_argument("--repeats", type=int, default=3, help="epochs per configuration; the median counts")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "bench-scaling")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling.json")
    args = parser.parse_args(argv)
    nprocs = [int(n) for n in args.nprocs.split(",")]
    if args.device == "cuda" and torch.cuda.device_count() < max(nprocs):
        parser.error(f"--nprocs asks for {max(nprocs)} GPUs, this machine has {torch.cuda.device_count()}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    ceiling = args.ceiling and 1 in nprocs
    trials = {n: [] for n in nprocs}
    alone = {n: [] for n in nprocs if n > 1 and ceiling}
    for _ in range(args.repeats):  # alternating rounds, so that a slow spell of the machine hits every configuration
        for n in nprocs:
            trials[n].append(
                one_epoch(args.recipe, n, args.device, args.threads, args.set, args.runs / f"{args.device}-{n}")
            )
            if n in alone:
                alone[n].append(
                    independent_epochs(
                        args.recipe,
                        n,
                        args.device,
                        args.threads,
                        args.set,
                        args.runs / f"{args.device}-{n}-independent",
                    )["images_per_second"]
                )
    rows = []
    for n in nprocs:
        each = [t["epoch_seconds"] for t in trials[n]]
        median = statistics.median(each)
        row = dict(
            min(trials[n], key=lambda t: abs(t["epoch_seconds"] - median))
        )  # the other fields: the median trial's
        row.update(epoch_seconds=median, images_per_second=row["images"] / median, epoch_seconds_each=each)
        rows.append(row)
    base = next((r for r in rows if r["processes"] == 1), rows[0])
    for r in rows:
        r["efficiency"] = r["images_per_second"] / (r["processes"] / base["processes"] * base["images_per_second"])
        if r["processes"] in alone:
            r["independent_images_per_second"] = statistics.median(alone[r["processes"]])
            r["ceiling_efficiency"] = r["independent_images_per_second"] / (r["processes"] * base["images_per_second"])
    result = {
        "recipe": Path(args.recipe).name,
        "repeats": args.repeats,
        "rows": rows,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
