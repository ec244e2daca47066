"""Guide families: a self-describing registry per kind of guide.

A family (M2's label guides, the z-guides, CCVAE's guides) declares what each member must provide;
a member is a class with a one-line ``description`` and those attributes, registered under a name.
The family is also a read-only mapping name -> description, which is what a zoo entry's ``guides``
(or ``z_guides``) is: recipes, ``pyrossl list``, the documentation's guide tables and ``ablate`` all
read the family, so a guide registered from a plugin is everywhere at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from pyrossl.errors import ConfigError


class GuideFamily(Mapping):
    """Guides of one kind: ``family[name]`` is a member's description, ``family.classes[name]`` its class.

    ``requires`` maps each attribute a member must have (a method, a class attribute) to what it is;
    :meth:`register` refuses a class that lacks one, naming what is missing. ``columns`` maps a heading
    of the family's guide table to what it reads of a member class: the table (:meth:`rows`,
    :meth:`table`, the site's guide tables) is made from the classes, so it cannot drift from them.
    """

    def __init__(self, what: str, requires: dict[str, str], columns: dict[str, Callable[[type], str]] | None = None):
        self.what = what
        self.requires = dict(requires)
        self.columns = dict(columns or {})
        self.classes: dict[str, type] = {}

    def header(self) -> list[str]:
        return ["name", "what it is", *self.columns]

    def rows(self) -> list[list[str]]:
        """One row per member, in the order of registration: name, description, then the columns."""
        return [
            [name, cls.description, *(str(read(cls)) for read in self.columns.values())]
            for name, cls in self.classes.items()
        ]

    def table(self) -> str:
        """The guide table as plain text (for a terminal or a notebook): one member per line."""
        rows = [self.header(), *self.rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def missing(self, cls) -> list[str]:
        """What ``cls`` lacks of the family's requirements, as ``name (what it is)``."""
        gaps = []
        description = getattr(cls, "description", None)
        if not isinstance(description, str) or not description.strip():
            gaps.append("description (a one-line str for the guide tables)")
        gaps += [f"{attr} ({what})" for attr, what in self.requires.items() if not hasattr(cls, attr)]
        return gaps

    def register(self, name: str, cls: type | None = None, *, replace: bool = False):
        """Add ``cls`` under ``name`` (usable as a decorator: ``@FAMILY.register("mine")``); returns it.

        A class lacking what the family requires is a ConfigError naming what is missing; a name already
        taken by another class is refused unless ``replace`` (a notebook cell run again)."""

        def add(cls):
            if not isinstance(name, str) or not name or name != name.strip():
                raise ConfigError(f"a guide's name is a non-empty string, not {name!r}")
            if not isinstance(cls, type):
                raise ConfigError(f"{self.what}: register takes a class, not {cls!r}")
            gaps = self.missing(cls)
            if gaps:
                raise ConfigError(
                    f"guide '{name}' ({cls.__name__}) is not one of the {self.what}: it lacks {'; '.join(gaps)}"
                )
            taken = self.classes.get(name)
            if taken is not None and taken is not cls and not replace:
                raise ConfigError(
                    f"guide name '{name}' is taken by {taken.__name__} among the {self.what} (pass replace=True to "
                    "replace it)"
                )
            self.classes[name] = cls
            return cls

        return add if cls is None else add(cls)

    def unregister(self, name: str) -> None:
        self.classes.pop(name, None)

    def cls(self, name: str) -> type:
        return self.classes[name]

    def __getitem__(self, name: str) -> str:
        return self.classes[name].description

    def __iter__(self) -> Iterator[str]:
        return iter(self.classes)

    def __len__(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return f"GuideFamily({self.what!r}: {', '.join(self.classes)})"
