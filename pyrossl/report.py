"""Figures of a run and an HTML page that shows them: what ``pyrossl report DIR`` and the trainer draw.

The trainer calls :func:`draw_figures` at the end of a run; :func:`write_report` redraws everything
from a run directory alone (config, metrics and checkpoint), so figures can be remade after the
plotting code changes or for a run whose figures were deleted.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from pyrossl import plots, runs
from pyrossl.data.splits import figure_sample
from pyrossl.figures import KINDS, Figure
from pyrossl.run import load_run


def figure_part(split, evaluate_on_train: bool) -> str:
    """The part of the split figures are drawn on: test, else validation, else (unsupervised) train."""
    if split.test.numel():
        return "test"
    if split.validation.numel() or not evaluate_on_train:
        return "validation"
    return "train"


def draw_figures(
    model,
    dataset,
    records: list[dict],
    x: torch.Tensor,
    y: torch.Tensor,
    folder: str | Path,
    seed: int = 0,
    outputs: dict | None = None,
) -> list[Path]:
    """Learning curves, the latent space coloured by class, and the model's own figures, into ``folder``.

    The images are a seeded sample of at most 2,000 of the part ``x``, stratified over its classes and
    interleaved (:func:`~pyrossl.data.splits.figure_sample`): a figure of the first ten shows ten classes.
    The entry says what to draw (:meth:`~pyrossl.zoo.Entry.figures`, with ``outputs``, the tables it
    kept in the run); :func:`draw` draws it.
    """
    folder = Path(folder)
    paths = []
    keys = sorted(
        {
            k
            for r in records
            for k, v in r.items()
            if k.startswith(("train_", "val_", "test_"))
            and k != "train_seconds"
            and isinstance(v, (int, float))
            and not k.endswith("active_units")
        }
    )  # a count, drawn with the KL per unit
    if records:
        paths.append(plots.plot_curves(records, ["loss"], folder / "loss.png", title="training loss"))
        if keys:
            paths.append(plots.plot_curves(records, keys, folder / "metrics.png", title="held-out metrics"))
        kl_prefix = next((p for p in ("val_", "train_") if any(p + "kl_per_unit" in r for r in records)), None)
        if kl_prefix:
            paths.append(plots.plot_kl_per_unit(records, kl_prefix, folder / "kl_per_unit.png"))
    rows = figure_sample(y, 2000, seed).to(x.device)
    x, y = x[rows], y[rows.to(y.device)]
    model.eval()
    try:
        z = model.latent(x)
    except NotImplementedError:
        z = None
    if z is not None and not dataset.multilabel:
        paths.append(
            plots.plot_latent_pca(
                z.cpu(),
                y.cpu(),
                folder / "latent_pca.png",
                classes=dataset.classes,
                title=f"{model.latent_title}, {dataset.name}",
            )
        )
    paths += [draw(figure, folder) for figure in model.figures(x, y, outputs or {})]
    return [Path(p) for p in paths]


def draw(figure: Figure, folder: str | Path) -> Path:
    """Draw one :class:`~pyrossl.figures.Figure` of an entry into ``folder/<name>.png`` (atomically)."""
    return getattr(plots, KINDS[figure.kind])(**figure.arguments, path=Path(folder) / f"{figure.name}.png")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def write_index(run_dir: str | Path, figures: list[Path]) -> Path:
    """``figures/index.html``: the run's summary table and every figure with its file name."""
    run_dir = Path(run_dir)
    folder = run_dir / runs.FIGURES
    summary = runs.read_summary(run_dir)
    best, last = summary.get("best", {}), summary.get("last", {})
    rows = "\n".join(
        f"<tr><td>{html.escape(k)}</td><td>{_cell(best[k])}</td><td>{_cell(last.get(k, ''))}</td></tr>"
        for k in best
        if isinstance(best[k], (int, float))
    )
    head = {
        k: summary[k]
        for k in (
            "model",
            "guide",
            "z_guide",
            "dataset",
            "seed",
            "epochs",
            "best_epoch",
            "selection_metric",
            "seconds",
            "device",
        )
        if k in summary
    }
    images = "\n".join(
        f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">'
        f"<figcaption>{html.escape(p.name)}</figcaption></figure>"
        for p in figures
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} td:first-child{{text-align:left}}
figure{{display:inline-block;margin:1em;vertical-align:top}} img{{max-width:560px}}</style></head>
<body><h1>{html.escape(run_dir.name)}</h1>
<p>{html.escape(json.dumps(head))}</p>
<table><tr><th>metric</th><th>best epoch</th><th>last epoch</th></tr>
{rows}
</table>
{images}
</body></html>
"""
    path = folder / "index.html"
    folder.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(path, page)
    return path


def write_report(run_dir: str | Path, which: str = "best", device: str = "cpu") -> tuple[Path, list[Path]]:
    """Redraw every figure of a run from its checkpoint and write ``figures/index.html``."""
    run_dir = Path(run_dir)
    if not runs.is_run(run_dir):  # said before anything is written: a path that is not a run stays as it was
        raise runs.CheckpointError(f"{run_dir} is not a run directory (no {runs.CONFIG})")
    with runs.RunLock(run_dir, "pyrossl report"):  # never beside a training that writes the same figures
        runs.prepare_output(run_dir / runs.FIGURES)  # a run that cannot take its figures is said before anything loads
        run = load_run(run_dir, which=which, device=device)
        return draw_run(run_dir, run.model, run.dataset, run.split, run.tensors, run.config.seed)


def draw_run(run_dir: str | Path, model, dataset, split, tensors, seed: int) -> tuple[Path, list[Path]]:
    """Every figure of the run ``run_dir`` and ``figures/index.html``, for its entry ``model`` as it is in
    memory: what the trainer draws at the end of a run and :func:`write_report` redraws. ``tensors(part)``
    gives a part's (x, y) (:meth:`pyrossl.run.Run.tensors`); the metrics and the entry's own tables are
    read from the run, the tables checked before anything is drawn."""
    run_dir = Path(run_dir)
    outputs = runs.read_outputs(run_dir, model)
    x, y = tensors(figure_part(split, model.evaluate_on_train))
    figures = draw_figures(
        model, dataset, runs.read_metrics(run_dir), x, y, run_dir / runs.FIGURES, seed=seed, outputs=outputs
    )
    return write_index(run_dir, figures), figures
