"""Guide benchmark: the z-guides and the label guides of the zoo, several seeds, mean ± sd.

    python benchmarks/guides.py --part vae                  # VAE on binarised mnist5k, every z-guide
    python benchmarks/guides.py --part m2-mnist5k           # M2, 100 labels: label guides x {diag-normal, flow}
    python benchmarks/guides.py --part m2-fmnist            # the same on Fashion-MNIST (long: about 14 min a run)
    python benchmarks/guides.py --part gmm-vae              # gmm-vae on the 3,000 digits, every z-guide
    python benchmarks/guides.py --part ccvae                # ccvae on shapes, every z-guide
    python benchmarks/guides.py --part vae --seeds 0 --set train.epochs=2 --runs /tmp/b   # a quick look

Every run is a recipe of ``runs/`` with ``z_guide``, ``guide`` and the part's overrides, trained (or
finished, or just read) in ``--runs/<part>/<variant>-seed<s>``. Reported per variant, mean ± sd over
the seeds:

- ``vae``: 300 epochs; test ELBO and IWAE log p(x) (k = 1000) at the best validation epoch, seconds per epoch;
  targets: ``flow`` at least 1 nat above ``diag-normal`` in IWAE log p(x), its epoch at most 1.6x;
- ``m2-*``: test accuracy at the best validation epoch and at the last epoch, for every label guide
  with ``diag-normal`` and ``flow``, beside the supervised-only classifier on the same labels;
- ``gmm-vae``: cluster accuracy, NMI and the ELBO of the 3,000 digits; ``ccvae``: test accuracy, and the
  intervention accuracy and latent walks judged by ``benchmarks/ccvae.py``'s CNN judge (one judge, fitted
  once on the real training images, for every run).
A Markdown table goes to stdout, every number to JSON (``--out``), and the validation curve of each
variant (mean ± sd over seeds) to a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from pyrossl import plots, runs
from pyrossl.config import load_config
from pyrossl.evaluate import mean_sd
from pyrossl.train import train_to_completion, tune_allocator

ROOT = Path(__file__).resolve().parents[1]
Z_GUIDES = ["diag-normal", "lowrank-normal", "flow"]
LABEL_GUIDES = ["enum", "gumbel", "st-gumbel", "logistic-normal", "sample", "dirichlet", "logistic-normal-latent"]


def _m2_part(recipe: str, extra: list[str]) -> dict:
    variants = [
        (f"{g} / {z}", [f"guide={g}", f"z_guide={z}"], recipe) for g in LABEL_GUIDES for z in ("diag-normal", "flow")
    ]
    # the baseline: the network of q(y|x) on the labels alone, as many labelled steps as M2 (run_one)
    variants.append(("labels alone (classifier)", ["model=classifier", "guide=none", "options={}"], recipe))
    return {
        "variants": variants,
        "extra": extra,
        "metrics": ["test_accuracy", "last_test_accuracy"],
        "curve": "val_accuracy",
    }


PARTS = {
    "vae": {
        "variants": [(z, [f"z_guide={z}"], "runs/vae-mnist5k.toml") for z in Z_GUIDES],
        # 300 epochs (the recipe's 40 leave every z-guide far from converged: validation ELBO still
        # rising by 1 nat per 5 epochs); the best validation epoch is tested
        "extra": ["data.binarize=true", "train.iwae_samples=1000", "train.epochs=300"],
        "metrics": ["test_elbo", "test_log_likelihood"],
        "curve": "val_elbo",
    },
    "m2-mnist5k": _m2_part("runs/m2-mnist5k-100.toml", []),
    "m2-fmnist": _m2_part("runs/m2-fmnist-100.toml", []),
    "gmm-vae": {
        "variants": [(z, [f"z_guide={z}"], "runs/gmm-vae-mnist3000.toml") for z in Z_GUIDES],
        "extra": [],
        "metrics": ["train_cluster_accuracy", "train_nmi", "train_elbo"],
        "curve": "train_cluster_accuracy",
    },
    "ccvae": {
        "variants": [(z, [f"z_guide={z}"], "runs/ccvae-shapes.toml") for z in Z_GUIDES],
        "extra": [],
        "metrics": [
            "test_accuracy",
            "last_test_accuracy",
            "intervention_accuracy",
            "walk_own_change",
            "walk_other_change",
        ],
        "curve": "val_accuracy",
        "judged": True,
    },
}


def judged(out: Path, judges: dict, judge_limit: int = 20000, test_limit: int = 2000) -> dict:
    """Intervention accuracy and latent walks of a finished CCVAE run, as ``benchmarks/ccvae.py`` scores
    them: z_c set to each attribute's prior means, decoded, and read by one judge shared by every run."""
    from ccvae import fit_dataset_judge  # benchmarks/ccvae.py, beside this script

    from pyrossl.run import load_run

    run = load_run(out)
    if "judge" not in judges:
        judges["judge"], judges["info"] = fit_dataset_judge(run, judge_limit)
    x_test = run.tensors("test")[0][:test_limit]
    scores = run.model.intervention_accuracy(x_test, judges["judge"])
    if run.model.multilabel:
        scores.update(run.model.walk_effects(x_test, judges["judge"]))
    return scores


def as_many_labelled_steps(config):
    """Overrides that give the labels-alone classifier as many labelled steps as M2 takes, evaluated as often.

    M2 joins a labelled batch to every ``labelled_every``-th of its ceil(N_u / B) unlabelled steps per
    epoch, while the classifier's epoch is one pass over the few labels (one step with 100 labels in
    batches of 100): at M2's epoch count it would train for 10-30 steps only. Its epochs are therefore
    M2's labelled steps over the classifier's steps per epoch, with an evaluation (and the best-epoch
    choice) once per M2 epoch.
    """
    t = config.train
    split = runs.split_for(config, runs.load_dataset_for(config))
    m2_steps = math.ceil(math.ceil(len(split.unlabelled) / t.batch_size) / t.labelled_every)
    own_steps = math.ceil(len(split.labelled) / (t.labelled_batch_size or t.batch_size))
    every = max(1, round(m2_steps / own_steps))
    return [f"train.epochs={t.epochs * every}", f"train.eval_every={every}", f"train.checkpoint_every={every}"]


def run_one(recipe: str, overrides: list[str], out: Path) -> tuple[dict, list[dict]]:
    """Train (or finish, or read) one run: its metrics, including the last epoch's as ``last_*``, and
    its ``metrics.jsonl`` records; the classifier baseline's epochs counted in M2 epochs."""
    config = load_config(ROOT / recipe, overrides + ["train.progress=false"])
    scale = 1
    if config.model == "classifier":
        extra = as_many_labelled_steps(config)
        config = load_config(ROOT / recipe, overrides + extra + ["train.progress=false"])
        scale = config.train.eval_every
    summary = train_to_completion(config, out)
    records = [{**r, "epoch": r["epoch"] / scale} for r in runs.read_metrics(out)]
    seconds = [r["train_seconds"] for r in records if "train_seconds" in r]
    row = {k: v for k, v in summary["best"].items() if isinstance(v, (int, float))}
    row.update({f"last_{k}": v for k, v in summary["last"].items() if isinstance(v, (int, float))})
    row["seconds_per_epoch"] = statistics.mean(seconds) * scale if seconds else float("nan")
    row["best_epoch"] = summary["best_epoch"] / scale
    for key in ("val_active_units", "train_active_units"):
        if key in summary["best"]:
            row["active_units"] = summary["best"][key]
    return row, records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=list(PARTS), required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default="", help="comma-separated variant labels to run (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--runs", default=str(ROOT / "outputs" / "bench-guides"))
    parser.add_argument("--out", help="JSON file (default benchmarks/results/guides-<part>.json)")
    args = parser.parse_args(argv)
    tune_allocator()
    part = PARTS[args.part]
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
    start = time.time()
    results, curves, judges = {}, {}, {}
    for label, overrides, recipe in part["variants"]:
        if wanted and label not in wanted:
            continue
        slug = label.replace(" / ", "-").replace(" ", "-").replace("(", "").replace(")", "")
        rows = []
        for seed in seeds:
            out = Path(args.runs) / args.part / f"{slug}-seed{seed}"
            row, records = run_one(recipe, [*part["extra"], *overrides, *args.overrides, f"seed={seed}"], out)
            if part.get("judged"):
                row.update(judged(out, judges))
            rows.append(row)
            curves.setdefault(label, []).append(records)
            print(
                f"{label} seed {seed}: "
                + ", ".join(f"{k}={rows[-1][k]:.4f}" for k in part["metrics"] if k in rows[-1]),
                flush=True,
            )
        keys = [*part["metrics"], "seconds_per_epoch", "active_units"]
        results[label] = {"runs": rows, **{k: mean_sd([r[k] for r in rows]) for k in keys if all(k in r for r in rows)}}
    columns = [*part["metrics"], "seconds_per_epoch", "active_units"]
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, res in results.items():
        cells = [f"{res[k][0]:.4f} ± {res[k][1]:.4f}" if k in res else "—" for k in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"\n{args.part}, seeds {args.seeds}, overrides {part['extra'] + args.overrides}\n\n{table}")
    if args.part == "vae" and {"diag-normal", "flow"} <= results.keys():
        gain = results["flow"]["test_log_likelihood"][0] - results["diag-normal"]["test_log_likelihood"][0]
        ratio = results["flow"]["seconds_per_epoch"][0] / results["diag-normal"]["seconds_per_epoch"][0]
        print(
            f"\nflow - diag-normal IWAE log p(x): {gain:+.3f} nats (target >= 1); epoch ratio {ratio:.2f} (target <= "
            "1.6)"
        )
        results["targets"] = {"log_likelihood_gain": gain, "epoch_ratio": ratio}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"guides-{args.part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # the first tenth of the epochs left out: their steep rise would flatten the differences
    cut = int(max((r.get("epoch", 0) for rs in curves.values() for recs in rs for r in recs), default=0)) // 10
    shown = {label: [[r for r in recs if r.get("epoch", 0) > cut] for recs in rs] for label, rs in curves.items()}
    figure = plots.plot_bands(
        shown,
        part["curve"],
        out.with_suffix(".png"),
        title=f"{args.part}: {part['curve']} after epoch {cut}, mean ± sd over seeds {args.seeds}",
    )
    out.write_text(
        json.dumps(
            {
                "part": args.part,
                "seeds": seeds,
                "overrides": part["extra"] + args.overrides,
                "seconds": round(time.time() - start, 1),
                "results": results,
                "table": table,
                **({"judge": judges["info"]} if "info" in judges else {}),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out} and {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
