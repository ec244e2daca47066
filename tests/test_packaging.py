"""models/ and guides/ ship inside the pyrossl namespace, never as top-level packages."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_models_and_guides_into_pyrossl(tmp_path):
    source = tmp_path / "src"  # a copy, so the build writes nothing into the checkout
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for name in ("pyrossl", "models", "guides"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(source),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("pyrossl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pyrossl/models/m2.py" in names and "pyrossl/guides/label.py" in names and "pyrossl/cli.py" in names
    assert not [n for n in names if n.startswith(("models/", "guides/", "tests/", "benchmarks/"))]


def test_source_checkout_imports_the_models_from_the_repository():
    import pyrossl.models.vae

    assert Path(pyrossl.models.vae.__file__).resolve() == ROOT / "models" / "vae.py"


def _module_graph() -> dict[str, set[str]]:
    """Every module of the package (pyrossl/, models/ as pyrossl.models, guides/ as pyrossl.guides)
    and the package modules it imports, at module level or inside a function. ``from pyrossl import
    runs`` is an import of ``pyrossl.runs``, not of the package's ``__init__``."""
    import ast

    files = {}
    for folder, package in (
        (ROOT / "pyrossl", "pyrossl"),
        (ROOT / "models", "pyrossl.models"),
        (ROOT / "guides", "pyrossl.guides"),
    ):
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            files[".".join([package, *parts])] = path
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                found |= subs if len(subs) == len(node.names) else subs | {node.module}
        graph[name] = (found & files.keys()) - {name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_package_imports_without_a_circle():
    graph = _module_graph()
    assert len(graph) > 40 and graph["pyrossl.run"] >= {"pyrossl.registry", "pyrossl.runs"}
    assert _circles(graph) == []
    # the layers at the bottom import nothing of the zoo above them
    assert graph["pyrossl.files"] <= {"pyrossl.errors"}
    assert not graph["pyrossl.runs"] & {
        "pyrossl.registry",
        "pyrossl.train",
        "pyrossl.run",
        "pyrossl.report",
        "pyrossl.plots",
    }
    assert not graph["pyrossl.plots"] & {"pyrossl.runs", "pyrossl.train", "pyrossl.report"}


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
