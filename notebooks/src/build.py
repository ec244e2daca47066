"""Write each tutorial notebook from its source: ``python notebooks/src/build.py``.

A source ``notebooks/src/NAME.py`` is a Python file whose cells start at lines ``# %%`` (code) or
``# %% [markdown]`` (Markdown, each line's leading ``# `` removed); it becomes
``notebooks/NAME.ipynb``, without outputs. The sources are what is reviewed and diffed;
``tests/test_notebooks.py`` checks that every notebook is the build of its source.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def notebook(source: str) -> nbformat.NotebookNode:
    cells = []
    for chunk in source.split("\n# %%")[1:]:
        header, _, body = chunk.partition("\n")
        body = body.strip("\n")
        if header.strip() == "[markdown]":
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(text))
        else:
            cells.append(nbformat.v4.new_code_cell(body))
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i}"  # stable ids: a rebuild of an unchanged source is byte-identical
    return nbformat.v4.new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
    )


def main(names: list[str]) -> None:
    for path in sorted(HERE.glob("*.py")):
        if path.name == "build.py" or (names and path.stem not in names):
            continue
        nbformat.write(notebook(path.read_text()), HERE.parent / f"{path.stem}.ipynb")
        print(f"wrote notebooks/{path.stem}.ipynb")


if __name__ == "__main__":
    main(sys.argv[1:])
