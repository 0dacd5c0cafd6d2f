"""The on-disk dataset layout shared by 3CAD and MVTec AD.

``<root>/<Category>/{train/good, test/good, test/<defect>, ground_truth/<defect>/<mask>}``, and an
optional ``validation/good`` (our addition, for model selection that never touches test).

3CAD names a mask like its image (``<stem>.png``); MVTec appends ``_mask`` (``<stem>_mask.png``).
The style is detected per category from the files present, so one loader serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from threecad.errors import ThreecadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
SPLITS = ("train", "validation", "test")
MaskStyle = Literal["3cad", "mvtec"]
MVTEC_SUFFIX = "_mask"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset tree (paths only; loaders decode on demand)."""

    image_path: Path
    mask_path: Path | None
    label: int  # 0 good, 1 defective (from the folder)
    category: str
    defect: str  # "good" or the defect-type folder
    split: str  # "train", "validation" or "test"

    @property
    def stem(self) -> str:
        return self.image_path.stem

    @property
    def relpath(self) -> str:
        """``<split>/<defect>/<file name>``: the image's path below its category folder."""
        return f"{self.split}/{self.defect}/{self.image_path.name}"


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_categories(root: str | Path) -> list[str]:
    """Category folders of a dataset root: sub-folders holding ``train`` or ``test``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ThreecadError("dataset root is not a directory", root)
    cats = sorted(p.name for p in root.iterdir() if p.is_dir() and ((p / "train").is_dir() or (p / "test").is_dir()))
    if not cats:
        raise ThreecadError("no category folders (expected <root>/<Category>/train and test)", root)
    return cats


def detect_mask_style(category_dir: str | Path) -> MaskStyle:
    """'mvtec' if any ground-truth file ends in ``_mask``, else '3cad' (also for empty trees)."""
    gt = Path(category_dir) / "ground_truth"
    if gt.is_dir():
        for path in gt.rglob("*"):
            if is_image(path):
                return "mvtec" if path.stem.endswith(MVTEC_SUFFIX) else "3cad"
    return "3cad"


def mask_name(stem: str, style: MaskStyle = "3cad", suffix: str = ".png") -> str:
    return f"{stem}{MVTEC_SUFFIX if style == 'mvtec' else ''}{suffix}"


def list_samples(
    root: str | Path, category: str, split: str = "test", style: MaskStyle | None = None
) -> list[Sample]:
    """All images of one split of one category, folders and files sorted by name.

    Defective images get the mask path the layout implies, whether or not the file exists
    (``verify`` reports missing ones; loaders raise when they need it).
    """
    if split not in SPLITS:
        raise ThreecadError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    cat_dir = Path(root) / category
    if not cat_dir.is_dir():
        raise ThreecadError(f"category {category!r} not found", cat_dir)
    style = style or detect_mask_style(cat_dir)
    split_dir = cat_dir / split
    samples: list[Sample] = []
    if not split_dir.is_dir():
        return samples
    for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image_path in sorted(p for p in defect_dir.iterdir() if is_image(p)):
            if defect == GOOD:
                mask = None
            else:
                mask = cat_dir / "ground_truth" / defect / mask_name(image_path.stem, style)
            samples.append(Sample(image_path, mask, int(defect != GOOD), category, defect, split))
    return samples
