"""Sphinx configuration of the pyrossl documentation (``make docs`` -> docs/_build/html)."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent / "_ext"))
os.environ.setdefault("PYROSSL_QUICK", "1")  # tutorials run their small settings when the site is built
os.environ.setdefault("PYROSSL_TUTORIALS", str(ROOT / "outputs" / "tutorials-docs"))  # their runs: outside the sources

project = "pyrossl"
author = "the pyrossl developers"
copyright = "2026, the pyrossl developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings' "Raises:" / "Returns:" sections
    "sphinx.ext.mathjax",
    # MathJax 3 from the site itself (copied into _static/mathjax, mathjax_path set): the equations are
    # typeset without a network, where the default would load it from a CDN
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "myst_nb",
    "zoo_docs",
]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("PYROSSL_DOCS_EXECUTE", "force")
nb_execution_timeout = 600
nb_execution_raise_on_error = True  # a failing tutorial fails the build
# a cell's Markdown output (the tutorials' result tables) parsed as MyST, which has tables; CommonMark,
# the default, has none and printed each table as one line of pipes
nb_render_markdown_format = "myst"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# torch's and pyro's own classes are not documented here: references to them stay plain text
nitpicky = False
suppress_warnings = ["myst.header"]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]
html_theme = "furo"
html_title = "pyrossl"
html_static_path = []


def setup(app):
    # MathJax on every page, not only on those with equations of their own: the sidebar shows tutorial
    # headings with math ("What $q(y \\mid x)$ is unsure of") on every page
    app.set_html_assets_policy("always")
