"""Precision benchmark: each workload trained in fp32 and in bf16 (``train.precision``) side by side.

    python benchmarks/precision.py                          # every workload, seeds 0, 1, 2 (about 40 min on 2 cores)
    python benchmarks/precision.py --workloads vae-flow --seeds 0 --runs /tmp/p   # a quick look

For each workload and seed the two precisions train one after the other (fp32, then bf16), so a
slow spell of a shared machine touches both. Reported per workload, mean ± sd over the seeds:

- the bf16 epoch over the fp32 epoch: per run the median of its epochs' training seconds
  (``train_seconds`` of ``metrics.jsonl``: the steps and the entry's non-gradient stage, no
  evaluation), the ratio taken per seed. Target: at most 0.55;
- the task metric in each precision (test accuracy, cluster accuracy) and the ELBO / IWAE
  log-likelihood; targets: the bf16 mean within the fp32 3-seed sd (accuracies) and within 0.5 nat
  (ELBO, log-likelihood).

The workloads are the recipes of ``runs/`` shortened to fit one sitting (``WORKLOADS`` says how):
M2 ``enum`` and ``gumbel`` on mnist5k-100 and Fashion-MNIST-100, the flow-guided VAE on binarised
mnist5k, gmm-vae on the 3,000 digits. The machine (CPU model, its bf16 flags, threads) is printed
and written with the numbers: the ratio is a property of the hardware (AMX tiles multiply bf16 about
6x faster than fp32; AVX-512 BF16 alone about 2.3x).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from pyrossl import precision, runs
from pyrossl.config import load_config
from pyrossl.evaluate import mean_sd
from pyrossl.train import train_to_completion, tune_allocator

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16")
#: name -> (recipe, overrides, metrics: (key, kind) with kind "accuracy" or "nats")
WORKLOADS = {
    "m2-enum-mnist5k": (
        "runs/m2-mnist5k-100.toml",
        ["guide=enum", "train.epochs=15"],
        [("test_accuracy", "accuracy")],
    ),
    "m2-gumbel-mnist5k": (
        "runs/m2-mnist5k-100.toml",
        ["guide=gumbel", "train.epochs=15"],
        [("test_accuracy", "accuracy")],
    ),
    "m2-enum-fmnist": (
        "runs/m2-fmnist-100.toml",
        ["guide=enum", "train.epochs=5", "train.eval_every=5"],
        [("test_accuracy", "accuracy")],
    ),
    "m2-gumbel-fmnist": (
        "runs/m2-fmnist-100.toml",
        ["guide=gumbel", "train.epochs=5", "train.eval_every=5"],
        [("test_accuracy", "accuracy")],
    ),
    "vae-flow": (
        "runs/vae-mnist5k.toml",
        ["z_guide=flow", "data.binarize=true", "train.epochs=50", "train.eval_every=5", "train.iwae_samples=200"],
        [("test_elbo", "nats"), ("test_log_likelihood", "nats")],
    ),
    "gmm-vae": (
        "runs/gmm-vae-mnist3000.toml",
        ["train.epochs=40", "options.warmup_epochs=20", "train.eval_every=40"],
        [("train_cluster_accuracy", "accuracy"), ("train_elbo", "nats")],
    ),
}
TARGET_RATIO = 0.55
NATS = 0.5


def machine() -> dict:
    """What the ratio depends on: the CPU, its bf16 units, torch and its threads."""
    model = next(
        (ln.partition(":")[2].strip() for ln in _cpuinfo().splitlines() if ln.startswith("model name")),
        platform.processor(),
    )
    flags = sorted(f for f in precision.cpu_flags() if "bf16" in f or f.startswith("amx"))
    return {"cpu": model, "bf16_flags": flags, "torch": torch.__version__, "threads": torch.get_num_threads()}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def run_one(recipe: str, overrides: list[str], out: Path) -> dict:
    """Train (or finish, or read) one run: its best-epoch metrics and the median training epoch."""
    config = load_config(ROOT / recipe, overrides + ["train.progress=false", "train.figures=false"])  # timed runs
    summary = train_to_completion(config, out)
    seconds = [r["train_seconds"] for r in runs.read_metrics(out) if "train_seconds" in r]
    row = {k: v for k, v in summary["best"].items() if isinstance(v, (int, float))}
    row["epoch_seconds"] = statistics.median(seconds)
    row["precision"] = summary.get("precision", "fp32")
    return row


def judge(result: dict, metrics: list[tuple[str, str]]) -> dict:
    """Whether a workload meets the targets: the ratio, and each metric's bf16 mean against fp32."""
    verdict = {"ratio": result["ratio"][0] <= TARGET_RATIO}
    for key, kind in metrics:
        (m32, sd32), (m16, _) = result["fp32"][key], result["bf16"][key]
        verdict[key] = abs(m16 - m32) <= (sd32 if kind == "accuracy" else NATS)
    return verdict


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of: " + ", ".join(WORKLOADS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", default=str(ROOT / "outputs" / "bench-precision"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision.json"))
    args = parser.parse_args(argv)
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r} (valid: {', '.join(WORKLOADS)})")
    tune_allocator()
    seeds = [int(s) for s in args.seeds.split(",")]
    host = machine()
    print(f"machine: {host['cpu']}; bf16 flags: {', '.join(host['bf16_flags']) or 'none'}; torch {host['torch']}")
    start = time.time()
    results = {}
    for name in names:
        recipe, overrides, metrics = WORKLOADS[name]
        rows = {p: [] for p in PRECISIONS}
        for seed in seeds:
            for p in PRECISIONS:  # side by side: fp32 then bf16 of the same seed
                out = Path(args.runs) / name / f"{p}-seed{seed}"
                settings = [*overrides, *args.overrides, f"seed={seed}", f"train.precision={p}"]
                rows[p].append(run_one(recipe, settings, out))
            print(
                f"{name} seed {seed}: "
                + ", ".join(
                    f"{p} {rows[p][-1]['epoch_seconds']:.3f} s/epoch "
                    + " ".join(f"{k}={rows[p][-1][k]:.4f}" for k, _ in metrics if k in rows[p][-1])
                    for p in PRECISIONS
                ),
                flush=True,
            )
        result = {p: {"runs": rows[p]} for p in PRECISIONS}
        for p in PRECISIONS:
            for key in ["epoch_seconds", *(k for k, _ in metrics)]:
                result[p][key] = mean_sd([r[key] for r in rows[p]])
        result["ratio"] = mean_sd([b["epoch_seconds"] / f["epoch_seconds"] for f, b in zip(rows["fp32"], rows["bf16"])])
        result["meets"] = judge(result, metrics)
        results[name] = result
    lines = [
        "| workload | fp32 s/epoch | bf16 s/epoch | bf16 / fp32 | metric | fp32 | bf16 | within |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        for i, (key, kind) in enumerate(WORKLOADS[name][2]):
            head = (
                [name]
                + [f"{res[p]['epoch_seconds'][0]:.3f}" for p in PRECISIONS]
                + [f"{res['ratio'][0]:.2f} ± {res['ratio'][1]:.2f}" + ("" if res["meets"]["ratio"] else " (missed)")]
                if i == 0
                else ["", "", "", ""]
            )
            cells = [f"{res[p][key][0]:.4f} ± {res[p][key][1]:.4f}" for p in PRECISIONS]
            bound = "fp32 sd" if kind == "accuracy" else f"{NATS} nat"
            lines.append(
                "| " + " | ".join([*head, key, *cells, ("yes" if res["meets"][key] else "no") + f" ({bound})"]) + " |"
            )
    table = "\n".join(lines)
    print(f"\nseeds {args.seeds}, target bf16 / fp32 <= {TARGET_RATIO}\n\n{table}")
    report = {
        "machine": host,
        "seeds": seeds,
        "overrides": args.overrides,
        "workloads": {n: {"recipe": WORKLOADS[n][0], "overrides": WORKLOADS[n][1]} for n in names},
        "seconds": round(time.time() - start, 1),
        "results": results,
        "table": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
