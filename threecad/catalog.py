"""Facts about 3CAD: categories, the paper's Table 1, folder aliases and where the archives live.

Everything here is data from the paper and the official repository README, kept in one place so
``verify``, ``stats``, ``download`` and the leaderboard never restate it.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def test(self) -> int:
        return self.test_good + self.test_defect


#: The paper's Table 1, in the paper's column order.
CATEGORIES: tuple[CategoryInfo, ...] = (
    CategoryInfo("ACC", "Aluminum_Camera_Cover", 784, 369, 1077, 10, (288, 1024), (288, 1024)),
    CategoryInfo("AI", "Aluminum_Ipad", 2096, 913, 1134, 3, (760, 1024), (600, 1024)),
    CategoryInfo("AMF", "Aluminum_Middle_Frame", 1548, 731, 748, 5, (540, 1024), (800, 950)),
    CategoryInfo("ANMF", "Aluminum_New_Middle_Frame", 1072, 670, 736, 6, (400, 1024), (430, 1024)),
    CategoryInfo("ANI", "Aluminum_New_Ipad", 2233, 999, 3937, 4, (420, 1024), (580, 1024)),
    CategoryInfo("AP", "Aluminum_Pc", 1698, 911, 2250, 14, (430, 1024), (409, 1024)),
    CategoryInfo("CS", "Copper_Stator", 409, 196, 763, 1, (1024, 1024), (1024, 1024)),
    CategoryInfo("IS", "Iron_Stator", 653, 295, 817, 4, (1024, 1024), (1024, 1024)),
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

TOTAL_TRAIN = 10_493
TOTAL_TEST_GOOD = 5_084
TOTAL_TEST_DEFECT = 11_462


def canonical_category(name: str) -> str | None:
    """The canonical folder for a folder name, code or alias; ``None`` for a non-3CAD name."""
    if name in CATEGORY_FOLDERS:
        return name
    for info in CATEGORIES:
        if name.upper() == info.code:
            return info.folder
    return ALIASES.get(name)


def category_info(name: str) -> CategoryInfo | None:
    folder = canonical_category(name)
    return next((c for c in CATEGORIES if c.folder == folder), None)
