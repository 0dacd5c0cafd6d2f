"""Facts about 3CAD: categories, the paper's Table 1, folder aliases and where the archives live.

Everything here is data from the paper and the official repository README, kept in one place so
``verify``, ``stats``, ``download`` and the leaderboard never restate it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from threecad.errors import ThreecadError


@dataclass(frozen=True)
class CategoryInfo:
    code: str
    folder: str
    train: int
    test_good: int
    test_defect: int
    defect_types: int
    height: tuple[int, int]
    width: tuple[int, int]
    #: Ranges of anomalous regions (NE) and of defect types (TE) per defective image (README table).
    regions: tuple[int, int] | None = None
    types_per_image: tuple[int, int] | None = None

    @property
    def test(self) -> int:
        return self.test_good + self.test_defect


#: The paper's Table 1, in the paper's column order.
CATEGORIES: tuple[CategoryInfo, ...] = (
    CategoryInfo("ACC", "Aluminum_Camera_Cover", 784, 369, 1077, 10, (288, 1024), (288, 1024), (1, 6), (1, 1)),
    CategoryInfo("AI", "Aluminum_Ipad", 2096, 913, 1134, 3, (760, 1024), (600, 1024), (1, 10), (1, 2)),
    CategoryInfo("AMF", "Aluminum_Middle_Frame", 1548, 731, 748, 5, (540, 1024), (800, 950), (1, 9), (1, 4)),
    CategoryInfo("ANMF", "Aluminum_New_Middle_Frame", 1072, 670, 736, 6, (400, 1024), (430, 1024), (1, 6), (1, 2)),
    CategoryInfo("ANI", "Aluminum_New_Ipad", 2233, 999, 3937, 4, (420, 1024), (580, 1024), (1, 23), (1, 2)),
    CategoryInfo("AP", "Aluminum_Pc", 1698, 911, 2250, 14, (430, 1024), (409, 1024), (1, 12), (1, 3)),
    CategoryInfo("CS", "Copper_Stator", 409, 196, 763, 1, (1024, 1024), (1024, 1024), (1, 9), (1, 1)),
    CategoryInfo("IS", "Iron_Stator", 653, 295, 817, 4, (1024, 1024), (1024, 1024), (1, 12), (1, 2)),
)

CATEGORY_FOLDERS: tuple[str, ...] = tuple(c.folder for c in CATEGORIES)
CATEGORY_CODES: tuple[str, ...] = tuple(c.code for c in CATEGORIES)

#: Folder names seen in the official code and older releases, mapped to the canonical folder.
ALIASES: dict[str, str] = {
    "Aluminum_Middle-Frame": "Aluminum_Middle_Frame",
    "aluminum_camera_cover": "Aluminum_Camera_Cover",
    "aluminum_Camera_Cover": "Aluminum_Camera_Cover",
    "aluminum_ipad": "Aluminum_Ipad",
    "aluminum_middle-frame": "Aluminum_Middle_Frame",
    "aluminum_middle_frame": "Aluminum_Middle_Frame",
    "aluminum_new_middle_frame": "Aluminum_New_Middle_Frame",
    "aluminum_ipad_new": "Aluminum_New_Ipad",
    "aluminum_new_ipad": "Aluminum_New_Ipad",
    "aluminum_pc": "Aluminum_Pc",
    "copper_stator": "Copper_Stator",
    "iron_stator": "Iron_Stator",
}

@dataclass(frozen=True)
class ArchiveSource:
    """Where a released archive lives.

    ``sha256`` is ``None`` where the authors published none: ``3cad data download`` then prints the
    digest it computed so a lab can pin its copy (``--sha256``). The archive format is detected
    from the file's content, not its name, because the Drive listing does not state it.
    """

    name: str
    url: str
    filename: str
    sha256: str | None
    description: str


#: Archives linked from the official repository README (newest version first). Google Drive
#: serves large files through a confirmation page; ``threecad.ingest.download`` asks for the direct
#: download and says what to do when Drive still answers with a web page.
SOURCES: dict[str, ArchiveSource] = {
    "3cad": ArchiveSource(
        "3cad",
        "https://drive.google.com/file/d/1BIX0H8TZp0wmrAnXPw8_aCAIX1j1Fzwz/view?usp=sharing",
        "3CAD.zip",
        None,
        "3CAD with English defect-type folder names (released 2025-04-22; the current edition)",
    ),
    "3cad-pinyin": ArchiveSource(
        "3cad-pinyin",
        "https://drive.google.com/file/d/1zhCHL6oH8_IuEkU72F-9bltroiBHmmcH/view?usp=sharing",
        "3CAD-Pinyin.zip",
        None,
        "3CAD with Pinyin defect-type folder names (the only edition before 2025-04-22)",
    ),
    "3cad-first": ArchiveSource(
        "3cad-first",
        "https://drive.google.com/file/d/1VQLV5fqm84uNDqXtvhYS14XazpAeinMX/view?usp=drive_link",
        "3CAD-first.zip",
        None,
        "the earliest 3CAD link (superseded; kept so old copies can be traced)",
    ),
}

#: What the authors state about the dataset's licence: nothing (no LICENSE file, no README wording).
LICENSE_NOTE = "The 3CAD authors state no licence for the dataset or the code; ask them before redistributing it."


def _key(name: str) -> str:
    """How names are compared: case, surrounding spaces and ``-`` versus ``_`` do not matter."""
    return name.strip().lower().replace("-", "_")


#: Every folder name, code and alias by :func:`_key`, mapped to its canonical folder.
_LOOKUP: dict[str, str] = {
    **{_key(alias): folder for alias, folder in ALIASES.items()},
    **{_key(c.folder): c.folder for c in CATEGORIES},
    **{_key(c.code): c.folder for c in CATEGORIES},
}


def canonical_category(name: str) -> str | None:
    """The canonical folder for a folder name, code or alias (any case); ``None`` for a non-3CAD name."""
    return _LOOKUP.get(_key(name)) if isinstance(name, str) else None


def resolve_categories(
    available: Sequence[str], names: Sequence[str] | str | None, source: str | Path | None = None
) -> list[str]:
    """The folders of ``available`` (a dataset's category folders) that the user means by ``names``.

    The one place where a category named by a user becomes a folder: ``train``, ``predict``,
    ``evaluate``, the leaderboard and ``data stats``/``export-hf`` all call it, so ``--categories
    ANI,AP`` means the same everywhere. ``None``, an empty list or ``all`` mean every folder. A name
    is, in this order: a folder of the dataset; a 3CAD folder name, code (``ANI``) or catalogue
    alias in any case, mapped to the folder the dataset holds it under (which may itself be an alias
    such as ``Aluminum_Middle-Frame``); a folder equal to it ignoring case. Order is kept, duplicates
    dropped. Anything else is one error naming ``source`` that lists the folders and their codes.
    """
    folders = list(available)
    if isinstance(names, str):
        names = [names]
    if not names or any(isinstance(n, str) and n.strip().lower() == "all" and n not in folders for n in names):
        return folders
    chosen, unknown = [], []
    for name in names:
        folder = _resolve_one(folders, name)
        if folder is None:
            unknown.append(name)
        else:
            chosen.append(folder)
    if unknown:
        described = ", ".join(
            f"{n} (3CAD {canonical_category(n)}, not in this dataset)" if canonical_category(n) else str(n)
            for n in unknown
        )
        raise ThreecadError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {described}; the dataset has {_listing(folders)}",
            source,
        )
    return list(dict.fromkeys(chosen))


def _resolve_one(folders: list[str], name: str) -> str | None:
    if not isinstance(name, str):
        return None
    if name in folders:
        return name
    canonical = canonical_category(name)
    if canonical in folders:
        return canonical
    held = [f for f in folders if canonical is not None and canonical_category(f) == canonical]
    if len(held) == 1:  # the dataset names it by an alias
        return held[0]
    same = [f for f in folders if f.lower() == name.strip().lower()]
    return same[0] if len(same) == 1 else None


def _listing(folders: list[str]) -> str:
    """``Aluminum_Ipad (AI), Magnetic_Tile``: each folder with its 3CAD code where it has one."""
    codes = {c.folder: c.code for c in CATEGORIES}
    return ", ".join(f"{f} ({codes[canonical_category(f)]})" if canonical_category(f) else f for f in folders) or "none"


def category_info(name: str) -> CategoryInfo | None:
    folder = canonical_category(name)
    return next((c for c in CATEGORIES if c.folder == folder), None)
