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

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from threecad.errors import ThreecadError

#: Results of :meth:`LabelMap.resolve`.
OK, IGNORED, UNKNOWN = "ok", "ignored", "unknown"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _key(label: str) -> str:
    return str(label).strip().casefold()


def check_type_name(name: str, source: str | Path | None = None) -> str:
    """Defect types become folder names: refuse anything that is not a plain, safe name."""
    if not _SAFE.match(name) or name.casefold() == "good":
        raise ThreecadError(
            f"defect type {name!r} cannot be a folder name (use letters, digits, _ . + -; not 'good')", source
        )
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
        """(defect type, status) with status ``ok``, ``ignored`` or ``unknown``."""
        key = _key(label)
        if key in {_key(i) for i in self.ignore}:
            return None, IGNORED
        target = {_key(a): t for a, t in self.aliases.items()}.get(key)
        if self.is_open:
            name = target if target is not None else str(label).strip()
            return (name, OK) if _SAFE.match(name) and name.casefold() != "good" else (None, UNKNOWN)
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
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ThreecadError(f"cannot read label map ({exc.strerror})", path) from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ThreecadError(f"label map is not valid {path.suffix.lstrip('.').upper() or 'YAML'} ({exc})", path) from None
    if not isinstance(data, dict) or "names" not in data:
        raise ThreecadError("label map must be a mapping with a 'names' entry", path)
    names = data["names"]
    aliases = dict(data.get("aliases") or {})
    if isinstance(names, dict):
        for name, more in names.items():
            for alias in more or []:
                aliases[str(alias)] = str(name)
        names = list(names)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise ThreecadError("'names' must be a non-empty list of strings", path)
    ignore = data.get("ignore") or []
    if not isinstance(ignore, list):
        raise ThreecadError("'ignore' must be a list of labels", path)
    return LabelMap(tuple(names), {str(k): str(v) for k, v in aliases.items()}, frozenset(map(str, ignore)), str(path))
