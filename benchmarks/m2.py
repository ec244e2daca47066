"""M2 benchmark: every label guide on a recipe, several seeds, against the supervised-only baseline.

    python benchmarks/m2.py                                   # Fashion-MNIST, 100 labels, 3 seeds
    python benchmarks/m2.py --recipe runs/m2-digits.toml --guides enum,gumbel --seeds 0 --out /tmp/m2.json

For each guide and seed it trains the recipe (resuming runs already in ``--runs``), and reports the
test accuracy at the best validation epoch (mean and sd over seeds), seconds per training epoch and
examples per second. The supervised-only classifier (the network of q(y|x) on the labels alone, for
as many steps as M2 takes) is the baseline every number is read against.

It also times single training steps, alternately and on the same batches, of
- the SVI ``enum`` loss (``TraceEnum_ELBO``),
- the SVI ``gumbel`` loss (``TraceMeanField_ELBO``),
- a plain PyTorch implementation of the enumerated loss written here, on the same modules,
each in fp32 and in bf16 (``train.precision``), and prints the ratios: enum / plain is what Pyro adds
to the same networks and loss (target <= 1.10), gumbel / enum what enumeration costs.
Results go to a Markdown table on stdout and to JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pyrossl import runs
from pyrossl.config import load_config
from pyrossl.evaluate import mean_sd
from pyrossl.precision import networks_in
from pyrossl.registry import build_model
from pyrossl.run import load_run
from pyrossl.train import make_optimizer, train_to_completion, tune_allocator

GUIDES = "enum,gumbel,st-gumbel,logistic-normal,sample"


def run_one(recipe: str, overrides: list[str], out: Path) -> dict:
    """Train (or finish, or just read) one run directory; returns its summary."""
    return train_to_completion(load_config(recipe, overrides + ["train.progress=false"]), out)


def epoch_stats(out: Path, summary: dict) -> dict:
    records = runs.read_metrics(out)
    seconds = statistics.mean(r["train_seconds"] for r in records)
    split = summary["split"]
    per_epoch = split["unlabelled"] or split["labelled"]
    return {"seconds_per_epoch": seconds, "examples_per_second": per_epoch / seconds}


def plain_enumerated_loss(entry, x, x_lab, y_lab):
    """The M2 loss of ``entry`` (same modules) in plain PyTorch: y summed out, z by one sample.

    Unlabelled: -U(x) = -sum_y q(y|x) [log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y) - log q(y|x)];
    labelled: -L(x, y) with the analytic Gaussian KL (as TraceMeanField_ELBO), plus alpha * CE.
    """
    guide, model, k = entry.guide, entry.model, entry.meta["num_classes"]
    log_prior_y = -math.log(k)
    # unlabelled, every class at once: y is [K, 1, K]
    log_q = F.log_softmax(guide.classifier(x), -1)  # [B, K]
    y = torch.eye(k, device=x.device).unsqueeze(1)
    loc, scale = guide.z_encoder(x, y)  # [K, B, z]
    z = loc + scale * torch.randn_like(loc)
    logits = model.decoder(y, z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.flatten(1).expand_as(logits), reduction="none").sum(-1)
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    per_class = log_px + log_prior_y + log_pz - log_qz  # [K, B]
    q = log_q.exp().T
    unlabelled = -(q * (per_class - log_q.T)).sum(0).mean()
    # labelled
    y1 = F.one_hot(y_lab, k).float()
    loc, scale = guide.z_encoder(x_lab, y1)
    z = loc + scale * torch.randn_like(loc)
    logits = model.decoder(y1, z)
    log_px = -F.binary_cross_entropy_with_logits(logits, x_lab.flatten(1), reduction="none").sum(-1)
    kl = (0.5 * (loc**2 + scale**2 - 1) - scale.log()).sum(-1)
    labelled = -(log_px - kl + log_prior_y).mean()
    aux = entry.options.aux_weight * F.cross_entropy(guide.classifier(x_lab), y_lab)
    return unlabelled + labelled + aux


def time_steps(recipe: str, overrides: list[str], steps: int, warmup: int = 3) -> dict:
    """ms per optimiser step of SVI enum, SVI gumbel and plain PyTorch enum, in fp32 and in bf16
    (``pyrossl.precision.networks_in``), the six timed alternately on the same batches."""
    from pyrossl.runs import load_dataset_for, split_for

    config = load_config(recipe, overrides)
    data = load_dataset_for(config)
    split = split_for(config, data)
    bs, lbs = config.train.batch_size, config.train.labelled_batch_size or config.train.batch_size
    g = torch.Generator().manual_seed(0)
    built = {}
    for name in ("enum", "gumbel"):
        torch.manual_seed(0)
        built[name] = build_model(load_config(recipe, overrides + [f"guide={name}"]), data.meta())
    built["plain"] = built["enum"]  # same weights; each timed copy has its own parameters and optimiser

    def svi_loss(entry, x, xl, yl):
        return entry(x, xl, yl)

    losses = {"enum": svi_loss, "gumbel": svi_loss, "plain": plain_enumerated_loss}
    cells = [(name, p) for name in losses for p in ("fp32", "bf16")]
    entries = {cell: copy.deepcopy(built[cell[0]]) for cell in cells}
    optims = {cell: make_optimizer(config, e.parameters()) for cell, e in entries.items()}  # the trainer's optimiser
    times = {cell: [] for cell in cells}
    with contextlib.ExitStack() as stack:
        for (_, p), entry in entries.items():
            stack.enter_context(networks_in(entry, p))
        for step in range(warmup + steps):
            u = split.unlabelled[torch.randint(len(split.unlabelled), (bs,), generator=g)]
            lab = split.labelled[torch.randint(len(split.labelled), (lbs,), generator=g)]
            x, xl, yl = data.x[u], data.x[lab], data.y[lab]
            for cell in cells:
                start = time.perf_counter()
                loss = losses[cell[0]](entries[cell], x, xl, yl)
                optims[cell].zero_grad()
                loss.backward()
                optims[cell].step()
                if step >= warmup:
                    times[cell].append(time.perf_counter() - start)
    ms = {p: {name: 1000 * statistics.median(times[(name, p)]) for name in losses} for p in ("fp32", "bf16")}
    return {
        "batch": f"{bs} unlabelled + {lbs} labelled",
        "ms_per_step": ms["fp32"],
        "ms_per_step_bf16": ms["bf16"],
        "enum_over_plain": ms["fp32"]["enum"] / ms["fp32"]["plain"],
        "enum_over_plain_bf16": ms["bf16"]["enum"] / ms["bf16"]["plain"],
        "gumbel_over_enum": ms["fp32"]["gumbel"] / ms["fp32"]["enum"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="runs/m2-fmnist-100.toml")
    p.add_argument("--guides", default=GUIDES)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--runs", default="outputs/bench-m2", help="folder of the run directories (reused)")
    p.add_argument("--out", default="benchmarks/results/m2.json")
    p.add_argument("--timing-steps", type=int, default=20)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--timing-only", action="store_true", help="only the step timing, no training")
    p.add_argument("--diagnose", default="enum", help="guides whose runs get the q(y|x) / p(y|x) agreement check")
    p.add_argument("--diagnose-images", type=int, default=500)
    p.add_argument("--baseline-steps", type=int, default=2000, help="steps of the supervised-only classifier")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    stem = Path(args.recipe).stem
    diagnosed = set(args.diagnose.split(","))
    rows = []
    for guide in [] if args.timing_only else args.guides.split(","):
        accs, stats, best_epochs, agreement = [], [], [], []
        for seed in seeds:
            out = Path(args.runs) / f"{stem}-{guide}-seed{seed}"
            summary = run_one(args.recipe, args.overrides + [f"guide={guide}", f"seed={seed}"], out)
            accs.append(summary["test_accuracy"])
            best_epochs.append(summary["best_epoch"])
            stats.append(epoch_stats(out, summary))
            if guide in diagnosed:
                agreement.append(load_run(out).posterior_agreement(images=args.diagnose_images))
                print(
                    f"{guide} seed {seed}: q(y|x) and the generative p(y|x) on validation: {agreement[-1]}", flush=True
                )
            print(
                f"{guide} seed {seed}: test accuracy {summary['test_accuracy']:.4f} (best epoch "
                f"{summary['best_epoch']})",
                flush=True,
            )
        m, sd = mean_sd(accs)
        rows.append(
            {
                "method": f"m2 / {guide}",
                "test_accuracy_mean": m,
                "test_accuracy_sd": sd,
                "test_accuracy": accs,
                "best_epochs": best_epochs,
                "seconds_per_epoch": statistics.mean(s["seconds_per_epoch"] for s in stats),
                "examples_per_second": statistics.mean(s["examples_per_second"] for s in stats),
                **({"generative_agreement": agreement} if agreement else {}),
            }
        )
    if not (args.no_baseline or args.timing_only):
        accs = []
        reference = load_config(args.recipe, args.overrides)
        for seed in seeds:
            out = Path(args.runs) / f"{stem}-classifier-seed{seed}"
            # the same network as q(y|x): every option the classifier shares with M2
            shared = {k: v for k, v in reference.options.items() if k in ("hidden", "act", "net", "classifier_net")}
            overrides = args.overrides + [
                # one labelled batch per epoch; the best of 40 evaluations by validation
                "model=classifier",
                "guide=none",
                f"seed={seed}",
                f"train.epochs={args.baseline_steps}",
                f"train.eval_every={max(1, args.baseline_steps // 40)}",
                "options={" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in shared.items()) + "}",
            ]
            summary = run_one(args.recipe, overrides, out)
            accs.append(summary["test_accuracy"])
        m, sd = mean_sd(accs)
        rows.append(
            {
                "method": "supervised only (q(y|x) network, labels alone)",
                "test_accuracy_mean": m,
                "test_accuracy_sd": sd,
                "test_accuracy": accs,
            }
        )
    timing = time_steps(args.recipe, args.overrides, args.timing_steps)
    result = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "seeds": seeds,
        "rows": rows,
        "timing": timing,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print()
    print("| method | test accuracy at best validation (mean ± sd) | s / epoch | examples / s |")
    print("|---|---|---|---|")
    for r in rows:
        speed = (
            f"{r['seconds_per_epoch']:.1f} | {r['examples_per_second']:.0f}" if "seconds_per_epoch" in r else "– | –"
        )
        print(f"| {r['method']} | {r['test_accuracy_mean']:.4f} ± {r['test_accuracy_sd']:.4f} | {speed} |")
    for r in rows:
        if "generative_agreement" in r:
            mean = lambda k, r=r: statistics.mean(a[k] for a in r["generative_agreement"])  # noqa: E731
            print(
                f"\n{r['method']}, validation: q(y|x) accuracy {mean('q_accuracy'):.3f}, generative p(y|x) accuracy "
                f"{mean('generative_accuracy'):.3f}, the two agree on {mean('agreement'):.3f} of the images"
            )
    for p, key in (("fp32", ""), ("bf16", "_bf16")):
        ms = timing["ms_per_step" + key]
        print(
            f"\none step in {p} ({timing['batch']}): SVI enum {ms['enum']:.1f} ms, plain PyTorch enum "
            f"{ms['plain']:.1f} ms, SVI gumbel {ms['gumbel']:.1f} ms; enum / plain = "
            f"{timing['enum_over_plain' + key]:.2f} (Pyro's overhead, target <= 1.10)"
        )
    print(f"gumbel / enum (fp32) = {timing['gumbel_over_enum']:.2f} (target <= 0.33)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    tune_allocator()  # as `pyrossl train` does: this process only trains
    main()
