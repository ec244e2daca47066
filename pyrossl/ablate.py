"""Ablations: one recipe trained over guides, config values and seeds, then summarised.

``pyrossl ablate RECIPE --guides enum,gumbel --z-guides diag-normal,flow --vary options.aux_weight=1,5
--seeds 0,1,2`` trains
every combination into ``OUT/<variant>-seed<s>/`` (a finished run is read, a stopped one resumed:
re-running an ablation only trains what is missing) and writes into ``OUT``:

- ``ablation.csv``: one row per run: the variant, its seed, and every numeric metric of the best
  epoch (``summary.json``), plus seconds;
- ``ablation.md``: mean ± sd over seeds of each metric, one row per variant (one seed: the value alone);
- ``ablation.png``: the selection metric (validation; for unsupervised models scored on their
  training points, the ``train_`` one) against epoch, the mean with a band of ± one sd per variant;
  ``ablation-elbo.png`` the same of the validation ELBO, for entries that report one each epoch.

The cells are independent runs: ``--jobs N`` trains N of them at a time, each in a fresh process with
its share of the cores (``threads``: the cores over N, unless the recipe sets it), each one's numbers
those of the serial ablation with as many threads; a killed ablation, run again, reads the cells that
finished and resumes the others from their checkpoints. Past one machine, ``--commands`` prints one
``pyrossl train`` command line per cell (what a cluster's job array runs, one line per task) and
``--collect`` writes the tables once they have all finished, checking that each cell was trained
with its config.

Beside the task metric, every run of an entry with a likelihood reports on the test set the guide's
ELBO (``test_guide_elbo``), the IWAE bound with ``iwae`` samples (``test_log_likelihood``, default
k = 100; 0 turns both off) and their gap (``test_iwae_gap``, nats): how much tighter the posterior
could be than the guide makes it, an estimate from below of the guide's KL to the posterior.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from pyrossl import plots, runs
from pyrossl.config import load_config
from pyrossl.errors import ConfigError
from pyrossl.evaluate import mean_sd


@dataclass
class Variant:
    label: str  # "guide=enum,options.aux_weight=5"
    overrides: list[str]

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", self.label).replace("=", "-").replace(",", "_") or "base"


def parse_vary(spec: str) -> tuple[str, list[str]]:
    """``key=v1,v2,...`` -> (key, [v1, v2, ...]); values stay text for the config's own parser
    (:func:`ablate` builds every config, and so checks every value, before anything trains)."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise ConfigError(f"--vary takes KEY=V1,V2,..., not {spec!r}")
    return key, _split_values(values)


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes, so ``hidden=[256],[500,500]`` gives two values."""
    items, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += ch
    items.append(current.strip())
    if any(not v for v in items):
        raise ConfigError(f"empty value in {text!r}")
    return items


def variants(guides: list[str], vary: list[tuple[str, list[str]]], z_guides: list[str] = ()) -> list[Variant]:
    axes = (
        ([[("guide", g) for g in guides]] if guides else [])
        + ([[("z_guide", g) for g in z_guides]] if z_guides else [])
        + [[(k, v) for v in values] for k, values in vary]
    )
    out = []
    for combo in itertools.product(*axes):
        out.append(Variant(",".join(f"{k}={v}" for k, v in combo), [f"{k}={v}" for k, v in combo]))
    return out


def curve_key(records: list[dict], selection_metric: str) -> str:
    """The metric the picture follows: the selection metric, else its ``train_`` twin."""
    if any(selection_metric in r for r in records):
        return selection_metric
    twin = "train_" + selection_metric.removeprefix("val_")
    return twin if any(twin in r for r in records) else selection_metric


def ablate(
    recipe: str | Path,
    out: str | Path,
    guides: list[str] = (),
    seeds: list[int] = (0,),
    vary: list[str] = (),
    overrides: list[str] = (),
    device: str | None = None,
    z_guides: list[str] = (),
    iwae: int = 100,
    jobs: int = 1,
    collect: bool = False,
    commands: bool = False,
) -> dict:
    """Train every variant (guides × z-guides × varied values) × seed (finishing only what is missing)
    and write the summaries; ``iwae`` is k of the held-out IWAE bound (``train.iwae_samples``; 0: off);
    ``jobs``: cells trained at a time, each in its own process; ``collect``: train nothing, summarise
    cells trained elsewhere (each must have finished, with its config); ``commands``: train nothing,
    return ``{"commands": [...]}``, the ``pyrossl train`` line of each cell (:func:`cell_commands`)."""
    from pyrossl.registry import resolve

    parsed = [parse_vary(v) for v in vary]
    keys = [k for k, _ in parsed]
    if len(set(keys)) != len(keys) or ("guide" in keys and guides) or ("z_guide" in keys and z_guides):
        raise ConfigError("each key may be varied once (--guides counts as the key 'guide', --z-guides as 'z_guide')")
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    if isinstance(iwae, bool) or not isinstance(iwae, int) or iwae < 0:
        raise ConfigError(f"--iwae takes 0 (off) or a number of importance samples, not {iwae!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs takes a number of processes, at least 1, not {jobs!r}")
    # an ablation is one MLflow experiment (train.loggers = ["mlflow"]), named after its folder
    extra = [f"train.experiment={json.dumps(Path(out).name)}", *cell_settings(overrides, iwae, device)]
    all_variants = variants(list(guides), parsed, list(z_guides))
    # every config is built before anything trains: a bad key or value fails at once
    configs = {
        (v.label, s): load_config(recipe, [*extra, *v.overrides, f"seed={s}"]) for v in all_variants for s in seeds
    }
    out = Path(out)
    slugs = [v.slug for v in all_variants]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(
            f"two variants would share a run folder ({', '.join(sorted({s for s in slugs if slugs.count(s) > 1}))}): "
            "make the values differ in letters or digits"
        )
    for config in configs.values():  # every run's settings, checked before the first one trains
        resolve(config)
    if commands:
        return {"commands": cell_commands(recipe, out, all_variants, seeds, extra)}
    runs.prepare_output(out)  # before any data is loaded
    # one ablation at a time in OUT (its tables are its own); each run folder is locked by its trainer too
    with runs.RunLock(out, "pyrossl ablate"):
        cells = {(v.label, s): runs.child(out, f"{v.slug}-seed{s}") for v in all_variants for s in seeds}
        if collect:
            _check_collected(cells, configs)
        elif jobs > 1:
            _train_in_processes(cells, configs, jobs)
        return _train_and_summarise(recipe, out, all_variants, seeds, configs)


def cell_settings(overrides: list[str], iwae: int, device: str | None) -> list[str]:
    """What every cell adds to the recipe, before its variant's overrides and its seed."""
    settings = [f"train.iwae_samples={iwae}", *overrides, "train.progress=false"]
    return settings + ([f"device={device!r}"] if device else [])


def cell_commands(
    recipe: str | Path, out: str | Path, all_variants: list[Variant], seeds, settings: list[str]
) -> list[str]:
    """One ``pyrossl train`` command line per cell (shell-quoted), training what :func:`ablate` would
    into the folder where it looks for it: a cluster's job array runs one line per task."""
    lines = []
    for v in all_variants:
        for s in seeds:
            sets = [a for o in [*settings, *v.overrides, f"seed={s}"] for a in ("--set", o)]
            folder = runs.child(Path(out), f"{v.slug}-seed{s}")
            lines.append(shlex.join(["pyrossl", "train", str(recipe), *sets, "--out", str(folder)]))
    return lines


def _check_collected(cells: dict, configs: dict) -> None:
    """Every cell has finished, with the config the ablation gives it (runtime settings aside)."""
    from pyrossl.checkpoint import config_differences
    from pyrossl.registry import resolve
    from pyrossl.train import finished

    missing = []
    for key, run_dir in cells.items():
        summary = runs.read_summary(run_dir) if runs.is_run(run_dir) else {}
        config = resolve(configs[key])
        if not finished(summary, config):
            missing.append(run_dir.name)
            continue
        diff = config_differences(runs.read_config(run_dir), config)
        if diff:
            raise ConfigError(f"{run_dir} was trained with another config (it differs in {', '.join(diff)})")
    if missing:
        raise ConfigError(
            f"--collect: {len(missing)} of {len(cells)} cells have not finished ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}): train them (--commands lists them) or drop --collect"
        )


def _train_cell(config, run_dir: str) -> str | None:
    """One cell, in a process of its own: None once it has finished, else its error's one line."""
    from pyrossl.errors import PyrosslError
    from pyrossl.train import train_to_completion, tune_allocator

    tune_allocator()
    try:
        train_to_completion(config, run_dir)
    except PyrosslError as exc:
        return str(exc)
    return None


def _train_in_processes(cells: dict, configs: dict, jobs: int) -> None:
    """Train the cells ``jobs`` at a time, each in a fresh process (spawned: nothing of this one's state
    is inherited), the cores shared between them; the first failure stops what has not started."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {
            key: pool.submit(
                _train_cell,
                configs[key] if configs[key].threads else replace(configs[key], threads=threads),
                str(run_dir),
            )
            for key, run_dir in cells.items()
        }
        for key, future in futures.items():
            error = future.result()
            if error is not None:
                for other in futures.values():
                    other.cancel()
                raise ConfigError(f"ablation cell {cells[key].name}: {error}")


def _train_and_summarise(recipe, out: Path, all_variants: list[Variant], seeds, configs: dict) -> dict:
    """Train (or read) every run of the ablation and write its table and figures into ``out``."""
    from pyrossl.train import train_to_completion

    rows, curves, selection = [], {}, None
    for v in all_variants:
        curves[v.label] = []
        for s in seeds:
            run_dir = runs.child(out, f"{v.slug}-seed{s}")
            summary = train_to_completion(configs[(v.label, s)], run_dir)
            selection = selection or summary["selection_metric"]
            metrics = {
                k: val
                for k, val in summary["best"].items()
                if isinstance(val, (int, float)) and not isinstance(val, bool)
            }
            rows.append({"variant": v.label, "seed": s, "run": run_dir.name, **metrics, "seconds": summary["seconds"]})
            curves[v.label].append(runs.read_metrics(run_dir))
    metric_keys = sorted({k for r in rows for k in r} - {"variant", "seed", "run"})
    csv_path = out / "ablation.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["variant", "seed", "run", *metric_keys])
    writer.writeheader()
    writer.writerows(rows)
    runs.atomic_write_text(csv_path, buf.getvalue())
    table = markdown_table(rows, metric_keys)
    md_path = out / "ablation.md"
    runs.atomic_write_text(
        md_path, f"# Ablation of {Path(recipe).name} (seeds {', '.join(map(str, seeds))})\n\n{table}\n"
    )
    key = curve_key([r for rs in curves.values() for recs in rs for r in recs], selection)
    png_path = plots.plot_bands(curves, key, out / "ablation.png", title=f"{key}: mean ± sd over {len(seeds)} seed(s)")
    result = {"csv": csv_path, "markdown": md_path, "figure": png_path, "rows": rows, "table": table}
    if any("val_elbo" in r for rs in curves.values() for recs in rs for r in recs):
        result["elbo_figure"] = plots.plot_bands(
            curves, "val_elbo", out / "ablation-elbo.png", title=f"val_elbo (nats): mean ± sd over {len(seeds)} seed(s)"
        )
    return result


def markdown_table(rows: list[dict], metric_keys: list[str]) -> str:
    """Mean ± sd over seeds of every metric, one row per variant (in the order they ran)."""
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| variant | runs | " + " | ".join(metric_keys) + " |", "|---|---|" + "---|" * len(metric_keys)]
    for label in labels:
        mine = [r for r in rows if r["variant"] == label]
        cells = []
        for k in metric_keys:
            values = [r[k] for r in mine if k in r]
            if len(values) == 1:  # one run has no spread to show
                cells.append(f"{float(values[0]):.4g}")
            elif values:
                m, sd = mean_sd(values)
                cells.append(f"{m:.4g} ± {sd:.2g}")
            else:
                cells.append("—")
        lines.append(f"| {label or 'base'} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
