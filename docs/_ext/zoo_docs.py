"""Sphinx directives that write what the code already knows, so the site cannot drift from it.

- ``{zoo-options} NAME``: the entry's Options dataclass as a table (setting, type, default, the
  doc of each field, its ``metadata["doc"]``): :meth:`pyrossl.zoo.ZooModel.option_rows`;
- ``{zoo-guides} NAME``: the guides that fit the entry, its z-guides and the objectives it trains
  with, from the class attributes the registry checks recipes against, each guide family's table
  made from its classes (``{zoo-guide-family} label|z|ccvae``: one family's table alone;
  ``{zoo-guide-requires} label|z|ccvae``: what a member of it must provide);
- ``{zoo-recipes} NAME``: the recipes of ``runs/`` for the entry, with their first comment line;
- ``{zoo-config} SECTION``: the ``[data]`` or ``[train]`` settings of a recipe (and the top-level keys).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive

ROOT = Path(__file__).resolve().parents[2]


def _table(header: list[str], rows: list[list[str]], widths: list[int], literal=(0, 2)) -> nodes.table:
    table = nodes.table()
    group = nodes.tgroup(cols=len(header))
    table += group
    for width in widths:
        group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    group += head
    body = nodes.tbody()
    group += body
    for target, cells in ((head, [header]), (body, rows)):
        for cells_row in cells:
            row = nodes.row()
            for i, text in enumerate(cells_row):
                entry = nodes.entry()
                paragraph = nodes.paragraph()
                paragraph += nodes.literal(text=text) if i in literal and target is body and text else nodes.Text(text)
                entry += paragraph
                row += entry
            target += row
    return table


def _entry(name: str):
    from pyrossl.registry import MODELS

    if name not in MODELS:
        raise ValueError(f"unknown zoo entry {name!r} (valid: {', '.join(MODELS)})")
    return MODELS[name]


class ZooOptions(Directive):
    required_arguments = 1

    def run(self):
        cls = _entry(self.arguments[0])
        rows = [[r["name"], r["type"], r["default"], r["doc"]] for r in cls.option_rows()]
        return [_table(["setting (options.)", "type", "default", "what it does"], rows, [20, 14, 14, 52])]


def _family_table(family, default: str | None = None) -> nodes.table:
    """A guide family's table, made from its classes (:meth:`pyrossl.guides.family.GuideFamily.rows`)."""
    rows = [[name + (" (default)" if name == default else ""), *rest] for name, *rest in family.rows()]
    extra = len(family.columns)  # the description keeps half the width, the columns share the rest
    widths = [20, 50, *[30 // extra] * extra] if extra else [22, 78]
    return _table(family.header(), rows, widths, literal=(0,))


def _guides_table(guides: dict, default: str | None) -> nodes.table:
    from pyrossl.guides.family import GuideFamily

    if isinstance(guides, GuideFamily):
        return _family_table(guides, default)
    rows = [[g + (" (default)" if g == default else ""), text] for g, text in guides.items()]
    return _table(["name", "what it is"], rows, [22, 78], literal=(0,))


class ZooGuides(Directive):
    """The guides that fit an entry (``guide =``), its z-guides (``z_guide =``), each family's table
    made from the classes, then its guide aliases and objectives."""

    required_arguments = 1

    def run(self):
        cls = _entry(self.arguments[0])
        out = [nodes.paragraph(text="guide ="), _guides_table(cls.guides, cls.default_guide)]
        if cls.z_guides:
            out += [nodes.paragraph(text="z_guide ="), _guides_table(cls.z_guides, next(iter(cls.z_guides)))]
        if cls.guide_aliases:
            out.append(
                nodes.paragraph(
                    text="Guide aliases: " + "; ".join(f"{a} is {t}" for a, t in cls.guide_aliases.items()) + "."
                )
            )
        out.append(nodes.paragraph(text=f"train.objective: {', '.join(cls.objectives)}."))
        return out


def _family(name: str):
    from pyrossl.guides.ccvae import CCVAE_GUIDES
    from pyrossl.guides.label import LABEL_GUIDES
    from pyrossl.guides.zguide import DEFAULT_Z_GUIDE, Z_GUIDES

    families = {"label": (LABEL_GUIDES, "enum"), "z": (Z_GUIDES, DEFAULT_Z_GUIDE), "ccvae": (CCVAE_GUIDES, "ccvae")}
    if name not in families:
        raise ValueError(f"unknown guide family {name!r} (valid: {', '.join(families)})")
    return families[name]


class ZooGuideFamily(Directive):
    """A guide family's table by the family's name: ``label`` (M2's), ``z`` or ``ccvae``."""

    required_arguments = 1

    def run(self):
        return [_family_table(*_family(self.arguments[0]))]


class ZooGuideRequires(Directive):
    """What a member of a guide family must provide (its ``requires``, checked at registration)."""

    required_arguments = 1

    def run(self):
        family, _ = _family(self.arguments[0])
        rows = [
            ["description", "a one-line str, the guide tables' text"],
            *[[k, v] for k, v in family.requires.items()],
        ]
        return [_table(["attribute", "what it is"], rows, [20, 80], literal=(0,))]


class ZooRecipes(Directive):
    required_arguments = 1

    def run(self):
        name = self.arguments[0]
        _entry(name)
        items = nodes.bullet_list()
        for path in sorted((ROOT / "runs").glob("*.toml")):
            text = path.read_text()
            if tomllib.loads(text).get("model") != name:
                continue
            first = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
            item = nodes.list_item()
            paragraph = nodes.paragraph()
            paragraph += nodes.literal(text=f"runs/{path.name}")
            paragraph += nodes.Text(f": {first}" if first else "")
            item += paragraph
            items += item
        return [items] if len(items) else [nodes.paragraph(text="No recipe in runs/ yet.")]


class ZooConfig(Directive):
    required_arguments = 1

    def run(self):
        from pyrossl import config
        from pyrossl.config import option_rows

        section = self.arguments[0]
        classes = {"data": config.DataConfig, "train": config.TrainConfig, "top": config.Config}
        rows = option_rows(classes[section])
        if section == "top":
            rows = [r for r in rows if r["name"] not in ("data", "train", "options")]
        prefix = "" if section == "top" else f"{section}."
        return [
            _table(
                ["key", "type", "default", "what it does"],
                [[prefix + r["name"], r["type"], r["default"], r["doc"]] for r in rows],
                [22, 14, 14, 50],
            )
        ]


class ZooGraph(Directive):
    """The entry's Pyro model as ``pyro.render_model`` draws it for a small batch (rendered to SVG by
    graphviz's ``dot`` where it is installed; otherwise the page shows the graph's DOT source)."""

    required_arguments = 1

    def run(self):
        import shutil

        import pyro
        import torch
        from pyro import poutine

        from pyrossl.config import config_from_dict
        from pyrossl.infer.params import module_local
        from pyrossl.registry import build_model

        name = self.arguments[0]
        cls = _entry(name)
        meta = {
            "image_shape": (1, 8, 8),
            "num_classes": 3,
            "classes": ("a", "b", "c"),
            "num_examples": 4,
            "attributes": (),
            "multilabel": False,
        }
        entry = build_model(config_from_dict({"model": name}), meta)
        x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        if entry.wants_index:
            args, shown = (x, torch.zeros(4, entry.options.z_dim)), "(x, prior_loc)"
        elif cls.uses_labels:
            args, shown = (x, y), "(x, y): a labelled batch"
        else:
            args, shown = (x,), "(x,)"
        with module_local(), torch.no_grad():
            guide_trace = poutine.trace(entry.guide).get_trace(*args)
            latents = {
                k: site["value"]
                for k, site in guide_trace.nodes.items()
                if site["type"] == "sample" and not site["is_observed"] and type(site["fn"]).__name__ != "_Subsample"
            }
            # a flat prior (gae's) cannot be drawn from: its graph is the model's given the guide's latents
            model = poutine.condition(entry.model, data=latents) if name == "gae" else entry.model
            graph = pyro.render_model(model, model_args=args, render_distributions=True)
        given = (
            "poutine.condition(entry.model, data=the guide's z) (a flat prior cannot be drawn from), "
            if name == "gae"
            else "entry.model, "
        )
        caption = nodes.paragraph(text=f"pyro.render_model({given}model_args={shown}, render_distributions=True)")
        if shutil.which("dot"):
            svg = graph.pipe(format="svg").decode()
            return [nodes.raw("", f'<div class="zoo-graph">{svg[svg.index("<svg") :]}</div>', format="html"), caption]
        return [nodes.literal_block(graph.source, graph.source), caption]


def setup(app):
    app.add_directive("zoo-options", ZooOptions)
    app.add_directive("zoo-guides", ZooGuides)
    app.add_directive("zoo-guide-family", ZooGuideFamily)
    app.add_directive("zoo-guide-requires", ZooGuideRequires)
    app.add_directive("zoo-recipes", ZooRecipes)
    app.add_directive("zoo-config", ZooConfig)
    app.add_directive("zoo-graph", ZooGraph)
    return {"parallel_read_safe": True, "version": "1"}
