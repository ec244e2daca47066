"""The documentation site: it builds without a warning, its API reference covers every public name,
the tables it generates come from the code, and a reader without a network sees its equations typeset."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["pyrossl", "pyrossl.models", "pyrossl.guides", "pyrossl.data", "pyrossl.infer"]


def public_names() -> set[str]:
    """Every class and function defined in a public module of the five packages, by its full name."""
    names = set()
    modules = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        modules += [
            f"{package}.{m.name}"
            for m in pkgutil.iter_modules(pkg.__path__)
            if not m.name.startswith("_") and not m.ispkg and f"{package}.{m.name}" not in PACKAGES
        ]
    for name in modules:
        if name in ("pyrossl.models", "pyrossl.guides"):
            continue
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.startswith("_") or not (inspect.isclass(value) or inspect.isfunction(value)):
                continue
            if getattr(value, "__module__", None) == name:
                names.add(f"{name}.{attr}")
    return names


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built as CI builds it (warnings are errors), without executing notebooks."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(out / "doctrees"),
            str(ROOT / "docs"),
            str(out / "html"),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYROSSL_DOCS_EXECUTE": "off"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "html"


def test_the_api_reference_covers_every_public_name(site):
    from sphinx.util.inventory import InventoryFile

    with open(site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    documented = set()
    for kind, entries in (inventory.data if hasattr(inventory, "data") else inventory).items():
        if kind.startswith("py:"):
            documented |= set(entries)
    names = public_names()
    assert len(names) > 150  # the walk found the modules
    missing = sorted(names - documented)
    assert not missing, f"not in the API reference: {missing}"


def test_every_entry_has_a_page_with_its_generated_options(site):
    from pyrossl.registry import MODELS

    for name, cls in MODELS.items():
        page = (site / "zoo" / f"{name}.html").read_text()
        for row in cls.option_rows():
            assert f">{row['name']}<" in page, (name, row["name"])
        for guide in cls.guides:
            assert guide in page, (name, guide)


def test_the_guide_tables_on_the_site_are_the_families_tables(site):
    import html
    import re

    from pyrossl.guides.label import LABEL_GUIDES
    from pyrossl.guides.zguide import Z_GUIDES

    def text(page):  # the page's words, tags dropped, entities and smart quotes undone
        return html.unescape(re.sub(r"<[^>]+>", "", (site / "zoo" / page).read_text())).replace("\u2019", "'")

    m2, z = text("m2.html"), text("z-guides.html")
    for page, family in ((m2, LABEL_GUIDES), (m2, Z_GUIDES), (z, Z_GUIDES)):
        for row in family.rows():
            for cell in row:
                assert cell in page, (family.what, cell)


def test_option_rows_come_from_the_fields_and_document_every_setting():
    from pyrossl import config
    from pyrossl.registry import MODELS

    rows = {r["name"]: r for r in MODELS["m2"].option_rows()}
    assert rows["aux_weight"]["default"] == "50.0" and rows["aux_weight"]["type"] == "float"
    assert "auxiliary loss" in rows["aux_weight"]["doc"]
    assert rows["z_rank"]["doc"].startswith("lowrank-normal")  # a base class's field and doc
    serket = {r["name"]: r for r in MODELS["serket-vae-gmm"].option_rows()}
    assert (
        serket["z_dim"]["default"] == "18" and serket["z_dim"]["doc"] == "width of the continuous code z"
    )  # new default, inherited doc
    sections = [cls.Options for cls in MODELS.values()] + [config.DataConfig, config.TrainConfig]
    top = [r for r in config.option_rows(config.Config) if r["name"] not in ("data", "train", "options")]
    undocumented = [(s.__name__, r["name"]) for s in sections for r in config.option_rows(s) if not r["doc"]]
    assert undocumented + [r["name"] for r in top if not r["doc"]] == []
    assert list(rows) == [f.name for f in __import__("dataclasses").fields(MODELS["m2"].Options)]


def _site_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_site", ROOT / "docs" / "check_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_site_typesets_its_equations_and_loads_its_images_offline(site, tmp_path):
    check = _site_check()
    browser = check.chromium()
    if browser is None:
        pytest.skip("no Chromium on PATH (.ci/run installs Debian's chromium when it runs as root)")
    for page in ("zoo/m2.html", "tutorials/vae.html", "guide/contract.html"):
        report = check.inspect_page(browser, site / page)
        assert check.problems(report) == [], (page, report)
        assert report["typeset"] == report["equations"] >= 2, (page, report)
        assert report["mathjax_src"].startswith("file:") and report["mathjax_version"].startswith("3."), report
    assert not list(site.rglob("*.check.html"))  # the probes are gone
    # a page of equations only in the sidebar gets MathJax too; its image loads
    report = check.inspect_page(browser, site / "py-modindex.html")
    assert check.problems(report) == [] and report["images"] and report["typeset"] == report["equations"] >= 1

    # what the check catches: MathJax from a CDN (offline), an image that is not there
    page = (site / "zoo" / "vae.html").read_text(encoding="utf-8")
    src = re.search(r'<script[^>]*src="([^"]*tex-chtml\.js)"', page).group(1)
    broken = site / "zoo" / "broken.html"
    broken.write_text(
        page.replace(src, "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js").replace(
            "</body>", '<img src="missing.png" alt="gone"></body>', 1
        ),
        encoding="utf-8",
    )
    try:
        found = check.problems(check.inspect_page(browser, broken))
    finally:
        broken.unlink()
    assert found[0].startswith("MathJax is not served by the site: https://cdn.jsdelivr.net")
    assert "equations left as raw TeX" in found[1] and found[2] == "image did not load: missing.png"
    assert check.main([str(site), "nowhere.html"]) == 2
