"""Data-parallel scaling: training throughput of one epoch on 1 and more processes.

    python benchmarks/scaling.py                      # M2 on Fashion-MNIST, 1 and 2 CPU processes, 1 thread each
    python benchmarks/scaling.py --nprocs 1,2,4 --device cuda     # one GPU per process, where there are GPUs

Each configuration trains the recipe for one epoch in a fresh run directory (``pyrossl train
--nproc N``, torchrun underneath) and reads the epoch's training time from ``metrics.jsonl`` (steps
only: no evaluation, no data loading). Throughput is training images per second (M2: the unlabelled
images, each step also sees a labelled batch); the scaling efficiency of N processes is their
throughput over N times that of one process. The global batch is the recipe's in every
configuration, so each process computes 1/N of every step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from pyrossl import runs

ROOT = Path(__file__).resolve().parents[1]


def one_epoch(recipe: str, nproc: int, device: str, threads: int, overrides: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "pyrossl", "train", recipe, "--out", str(out), "--quiet", "--device", device,
               "--set", "train.epochs=1", "--threads", str(threads), *[a for o in overrides for a in ("--set", o)]]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    seconds = runs.read_metrics(out)[0]["train_seconds"]
    summary = runs.read_summary(out)
    images = summary["split"]["unlabelled"] or summary["split"]["labelled"]
    return {"processes": nproc, "device": device, "threads_per_process": threads, "epoch_seconds": seconds,
            "images": images, "images_per_second": images / seconds, "steps": summary["steps"],
            "test_accuracy": summary.get("test_accuracy")}


def table(rows: list[dict]) -> str:
    lines = ["| processes | device | threads each | epoch (s) | images/s | scaling efficiency |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['processes']} | {r['device']} | {r['threads_per_process']} | {r['epoch_seconds']:.1f} | "
                     f"{r['images_per_second']:.0f} | {r['efficiency']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "runs" / "m2-fmnist-100.toml"))
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "bench-scaling")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling.json")
    args = parser.parse_args(argv)
    nprocs = [int(n) for n in args.nprocs.split(",")]
    if args.device == "cuda" and torch.cuda.device_count() < max(nprocs):
        parser.error(f"--nprocs asks for {max(nprocs)} GPUs, this machine has {torch.cuda.device_count()}")
    rows = [one_epoch(args.recipe, n, args.device, args.threads, args.set, args.runs / f"{args.device}-{n}") for n in nprocs]
    base = next((r for r in rows if r["processes"] == 1), rows[0])
    for r in rows:
        r["efficiency"] = r["images_per_second"] / (r["processes"] / base["processes"] * base["images_per_second"])
    result = {"recipe": Path(args.recipe).name, "rows": rows, "cpu_count": os.cpu_count(),
              "torch": torch.__version__}
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
