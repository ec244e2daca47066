"""Plugins: modules or files, outside the package, that register zoo entries and guides.

Three ways to name them, all loaded before a recipe's model and guides are looked up:

- a recipe key ``plugins = ["my_package.zoo", "path/to/my_guides.py"]`` (``--set plugins=[...]``);
- ``--plugin NAME`` on every command (repeatable), added to the recipe's list for ``train``;
- an installed package's entry points in the group ``pyrossl.plugins``
  (``[project.entry-points."pyrossl.plugins"] mine = "my_package.zoo"`` in its ``pyproject.toml``),
  loaded in every process.

A run directory's ``config.toml`` records the run's plugins (files by their absolute path), so
``eval``, ``report``, ``train --resume``, ``ablate`` and :func:`pyrossl.load_run` find them in a fresh
process, or say in one line which one is missing. A plugin is imported once per process.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path

from pyrossl.errors import ConfigError

ENTRY_POINT_GROUP = "pyrossl.plugins"
_loaded: dict[str, object] = {}
_entry_points_loaded = False


def is_file_plugin(name: str) -> bool:
    """Whether ``name`` names a Python file (``*.py`` or a path) rather than an importable module."""
    return name.endswith(".py") or "/" in name or "\\" in name


def normalise(name: str, base: Path | None = None) -> str:
    """The name a run records: a file by its absolute path (relative ones against ``base``, default the
    working folder), a module as it is."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a plugin is a module name or a .py file, not {name!r}")
    name = name.strip()
    if is_file_plugin(name):
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = (base or Path.cwd()) / path
        return str(path.resolve())
    return name


def _import_file(path: Path):
    if not path.is_file():
        raise ConfigError(f"plugin file '{path}' does not exist (a run names its plugins in its config.toml)")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"pyrossl_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"plugin file '{path}' is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_plugin(name: str):
    """Import one plugin (a module name or a .py file) once; a ConfigError in one line when it is missing
    or fails on import."""
    key = normalise(name)
    if key in _loaded:
        return _loaded[key]
    try:
        module = _import_file(Path(key)) if is_file_plugin(key) else importlib.import_module(key)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and key.split(".")[0] == exc.name.split(".")[0] or exc.name == key:
            raise ConfigError(f"plugin '{key}' is missing: no module named '{exc.name}'") from None
        raise ConfigError(f"plugin '{key}' failed on import: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # the plugin's own error, said in one line with its name
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(
            f"plugin '{key}' failed on import: {type(exc).__name__}{': ' + first if first else ''}"
        ) from None
    _loaded[key] = module
    return module


def load_entry_points() -> list[str]:
    """Load every installed ``pyrossl.plugins`` entry point (once per process); returns their names."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return []
    _entry_points_loaded = True
    names = []
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as exc:
            raise ConfigError(
                f"plugin entry point '{entry_point.name}' ({entry_point.value}) failed on import: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        names.append(entry_point.name)
    return names


def load_plugins(names=()) -> None:
    """The installed entry points, then ``names`` (a recipe's ``plugins``), each imported once."""
    load_entry_points()
    for name in names or ():
        load_plugin(name)


__all__ = ["ENTRY_POINT_GROUP", "is_file_plugin", "load_entry_points", "load_plugin", "load_plugins", "normalise"]
