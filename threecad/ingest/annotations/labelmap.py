"""The label map: which annotation labels are defect types, under which name, and which to ignore.

3CAD renamed its Pinyin labels to English between releases, and factory annotators invent their
own spellings, so labels are resolved through aliases. Matching ignores case and surrounding
white space. A file looks like::

    names: [scratch, bump, pinhole]        # the defect types (output folder names)
    aliases: {huahen: scratch, tuqi: bump}  # other spellings
    ignore: [marker]                       # labels that are not defects

YAML (``.yaml``/``.yml``) or JSON (``.json``). Without a label map every label is its own type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from threecad.errors import ThreecadError
from threecad.ingest.annotations.jsonfile import check_depth, read_json, read_text_bounded

#: Results of :meth:`LabelMap.resolve`.
OK, IGNORED, UNKNOWN = "ok", "ignored", "unknown"
#: Longest folder name (defect type or category) and longest label looked up: 255 characters,
#: the file-system limit for one name (the names are ASCII, so characters are bytes).
MAX_NAME_CHARS = 255
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _key(label: str) -> str:
    return str(label).strip().casefold()


def folder_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a folder name (defect type or category), or None when it can.

    The one rule for names that become folders: ASCII letters, digits and ``_ . + -``, starting
    with a letter or digit (so no ``..``, no separator, no hidden name, no white space), at most
    :data:`MAX_NAME_CHARS` characters. Checked before any path is built, then the path itself is
    checked again with :func:`threecad.paths.inside` when written.
    """
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a string"
    if len(name) > MAX_NAME_CHARS:
        return f"it has {len(name):,} characters (limit {MAX_NAME_CHARS})"
    if not _SAFE.fullmatch(name):
        return "use ASCII letters, digits and _ . + - only, starting with a letter or digit"
    return None


def type_name_problem(name: object) -> str | None:
    """:func:`folder_name_problem`, plus: a defect type may not be ``good`` (the normal folder)."""
    why = folder_name_problem(name)
    if why is None and name.casefold() == "good":
        return "'good' is the folder of normal images"
    return why


def check_type_name(name: str, source: str | Path | None = None) -> str:
    """Defect types become folder names: refuse anything that is not a plain, safe name."""
    why = type_name_problem(name)
    if why:
        shown = name if not isinstance(name, str) or len(name) <= 80 else f"{name[:80]}..."
        raise ThreecadError(f"defect type {shown!r} cannot be a folder name: {why}", source)
    return name


@dataclass(frozen=True)
class LabelMap:
    """Resolve raw labels to defect types. ``names=()`` means open: every label is its own type."""

    names: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    ignore: frozenset[str] = frozenset()
    source: str | None = None

    def __post_init__(self) -> None:
        for name in self.names:
            check_type_name(name, self.source)
        known = {_key(n) for n in self.names}
        for alias, target in self.aliases.items():
            if self.names and _key(target) not in known:
                raise ThreecadError(f"alias {alias!r} points to {target!r}, which is not in names", self.source)

    @property
    def is_open(self) -> bool:
        return not self.names

    def resolve(self, label: str) -> tuple[str | None, str]:
        """(defect type, status) with status ``ok``, ``ignored`` or ``unknown``.

        A label that is not a string or is longer than :data:`MAX_NAME_CHARS` is unknown before
        any comparison (no casefolding of a megabyte-long label).
        """
        if not isinstance(label, str) or len(label) > MAX_NAME_CHARS:
            return None, UNKNOWN
        key = _key(label)
        if key in {_key(i) for i in self.ignore}:
            return None, IGNORED
        target = {_key(a): t for a, t in self.aliases.items()}.get(key)
        if self.is_open:
            name = target if target is not None else str(label).strip()
            return (name, OK) if type_name_problem(name) is None else (None, UNKNOWN)
        key = _key(target) if target is not None else key
        for name in self.names:
            if _key(name) == key:
                return name, OK
        return None, UNKNOWN

    def to_dict(self) -> dict:
        return {"names": list(self.names), "aliases": dict(sorted(self.aliases.items())), "ignore": sorted(self.ignore)}


def load_label_map(path: str | Path) -> LabelMap:
    """Read a label map from YAML or JSON; ``names`` may also be a mapping name -> list of aliases."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = read_json(path, "label map")
    else:
        text = read_text_bounded(path, "label map")
        try:
            data = yaml.safe_load(text)
        except RecursionError:
            raise ThreecadError("label map nests too deeply", path) from None
        except yaml.YAMLError as exc:
            raise ThreecadError(f"label map is not valid YAML ({exc})", path) from None
        check_depth(data, path, "label map")
    if not isinstance(data, dict) or "names" not in data:
        raise ThreecadError("label map must be a mapping with a 'names' entry", path)
    names = data["names"]
    aliases = data.get("aliases") or {}
    if not isinstance(aliases, dict) or not all(map(_scalar, [*aliases, *aliases.values()])):
        raise ThreecadError("'aliases' must map labels to names (plain values, not lists or mappings)", path)
    aliases = {str(k): str(v) for k, v in aliases.items()}
    if isinstance(names, dict):
        for name, more in names.items():
            if not isinstance(more, (list, type(None))) or not all(map(_scalar, more or [])):
                raise ThreecadError(f"the aliases of {name!r} under 'names' must be a list of labels", path)
            for alias in more or []:
                aliases[str(alias)] = str(name)
        names = list(names)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise ThreecadError("'names' must be a non-empty list of strings", path)
    ignore = data.get("ignore") or []
    if not isinstance(ignore, list) or not all(map(_scalar, ignore)):
        raise ThreecadError("'ignore' must be a list of labels (plain values)", path)
    return LabelMap(tuple(names), aliases, frozenset(map(str, ignore)), str(path))


def _scalar(value: object) -> bool:
    """A plain YAML/JSON value that ``str()`` turns into a label (YAML reads ``7`` or ``no`` as non-strings)."""
    return isinstance(value, (str, int, float))
