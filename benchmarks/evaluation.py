"""Evaluation benchmark: what share of an evaluated epoch the evaluation takes, per entry.

    python benchmarks/evaluation.py                       # every workload (about 10 min on 2 cores)
    python benchmarks/evaluation.py --workloads vae-flow --runs /tmp/e    # one

Each workload is a recipe of ``runs/`` with its evaluation settings as they are (``train.eval_every``,
``train.eval_test``, ``train.diagnose_every``), shortened in epochs. From ``metrics.jsonl``: per
evaluated epoch, ``eval_seconds / (train_seconds + eval_seconds)`` (the training steps and the entry's
non-gradient stage against the scoring of the held-out parts), the median over the run. Target: at
most 0.20. For the flow-guided VAE over 300 epochs, also the whole loop (``summary.json``'s
``seconds``: steps, evaluation and checkpoints of every epoch) over its training time alone (target:
at most 1.2), and, separately, the end's test scoring (best and last epoch, IWAE with the recipe's k).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from pyrossl import runs
from pyrossl.config import load_config
from pyrossl.train import train, tune_allocator

ROOT = Path(__file__).resolve().parents[1]
#: name -> (recipe, overrides)
WORKLOADS = {
    "m2-fmnist": ("runs/m2-fmnist-100.toml", ["train.epochs=3"]),
    "m2-mnist5k": ("runs/m2-mnist5k-100.toml", ["train.epochs=10"]),
    "vae-flow": ("runs/vae-mnist5k.toml", ["z_guide=flow", "data.binarize=true", "train.epochs=300"]),
    "vae": ("runs/vae-mnist5k.toml", ["train.epochs=20"]),
    "ccvae": ("runs/ccvae-shapes.toml", ["train.epochs=3"]),
    "gae": ("runs/gae-mnist5k.toml", ["train.epochs=5"]),
    "gmm-vae": ("runs/gmm-vae-mnist3000.toml", ["train.epochs=30", "options.warmup_epochs=10", "train.eval_every=5"]),
}
TARGET_FRACTION = 0.20
TARGET_LOOP = 1.2


def measure(recipe: str, overrides: list[str], out: Path) -> dict:
    """One fresh run: the median evaluation share of its evaluated epochs, and its time totals."""
    config = load_config(ROOT / recipe, overrides + ["train.progress=false"])
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: the time of every epoch
    start = time.perf_counter()
    summary = train(config, out)
    wall = time.perf_counter() - start
    records = runs.read_metrics(out)
    evaluated = [r for r in records if "eval_seconds" in r]
    shares = [r["eval_seconds"] / (r["train_seconds"] + r["eval_seconds"]) for r in evaluated]
    train_total = sum(r["train_seconds"] for r in records)
    return {
        "epochs": len(records),
        "evaluated_epochs": len(evaluated),
        "eval_fraction": statistics.median(shares),
        "train_seconds_per_epoch": statistics.median(r["train_seconds"] for r in records),
        "eval_seconds_per_evaluation": statistics.median(r["eval_seconds"] for r in evaluated),
        "train_seconds": train_total,
        "loop_seconds": summary["seconds"],
        "loop_over_training": summary["seconds"] / train_total,
        "end_seconds": wall - summary["seconds"],  # data loading, the end's test scoring, figures
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of: " + ", ".join(WORKLOADS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", default=str(ROOT / "outputs" / "bench-evaluation"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "evaluation.json"))
    args = parser.parse_args(argv)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r} (valid: {', '.join(WORKLOADS)})")
    tune_allocator()
    results = {}
    for name in names:
        recipe, overrides = WORKLOADS[name]
        results[name] = measure(recipe, [*overrides, *args.overrides], Path(args.runs) / name)
        r = results[name]
        print(f"{name}: evaluation {r['eval_fraction']:.3f} of an evaluated epoch", flush=True)
    lines = [
        "| workload | epochs (evaluated) | training s/epoch | evaluation s | evaluation share | loop / training |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        share = f"{r['eval_fraction']:.3f}" + ("" if r["eval_fraction"] <= TARGET_FRACTION else " (missed)")
        lines.append(
            f"| {name} | {r['epochs']} ({r['evaluated_epochs']}) | {r['train_seconds_per_epoch']:.3f} | "
            f"{r['eval_seconds_per_evaluation']:.3f} | {share} | {r['loop_over_training']:.3f} |"
        )
    table = "\n".join(lines)
    print(f"\ntargets: evaluation share <= {TARGET_FRACTION}; vae-flow loop / training <= {TARGET_LOOP}\n\n{table}")
    if "vae-flow" in results:
        r = results["vae-flow"]
        print(
            f"\nvae-flow, {r['epochs']} epochs: the loop {r['loop_seconds']:.1f} s over training alone "
            f"{r['train_seconds']:.1f} s = {r['loop_over_training']:.3f}; the end (test scoring, IWAE, figures) "
            f"{r['end_seconds']:.1f} s"
        )
    report = {"overrides": args.overrides, "results": results, "table": table}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
