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
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("pyrossl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pyrossl/models/m2.py" in names and "pyrossl/guides/label.py" in names and "pyrossl/cli.py" in names
    assert not [n for n in names if n.startswith(("models/", "guides/", "tests/", "benchmarks/"))]


def test_source_checkout_imports_the_models_from_the_repository():
    import pyrossl.models.vae

    assert Path(pyrossl.models.vae.__file__).resolve() == ROOT / "models" / "vae.py"
