"""``3cad data stats``: the paper's Table-1 statistics and Fig.-3 histograms for any dataset in the layout.

Per category: image counts per split, defect types, height and width ranges, and two columns the
official README adds: NE, the number of anomalous regions per defective image (8-connected
components of its mask), and TE, the number of defect types per defective image (known only from
metadata, the dataset's manifest (:mod:`threecad.dataset.manifest`): the folder layout stores one
type per image, so TE is left empty without it).

The histograms are the defect-area ratio (mask area / image area, one value per defective image)
and the bounding-box aspect ratio (width / height of each region's bounding box, one value per
region), both on logarithmic bins because they span orders of magnitude.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from threecad.dataset.catalog import resolve_categories
from threecad.dataset.layout import Sample, list_categories, list_samples
from threecad.dataset.manifest import image_metadata
from threecad.dataset.masks import read_mask
from threecad.io import image_size, write_bytes, write_json
from threecad.progress import progress

log = logging.getLogger(__name__)

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class CategoryStats:
    category: str
    train: int
    validation: int
    test_good: int
    test_defect: int
    defect_types: int
    height: tuple[int, int] | None
    width: tuple[int, int] | None
    regions: tuple[int, int] | None  # NE
    types_per_image: tuple[int, int] | None  # TE

    @property
    def test(self) -> int:
        return self.test_good + self.test_defect


@dataclass
class StatsReport:
    root: str
    categories: list[CategoryStats] = field(default_factory=list)
    area_ratios: dict[str, list[float]] = field(default_factory=dict)
    aspect_ratios: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"root": self.root, "categories": [asdict(c) for c in self.categories],
                "area_ratios": self.area_ratios, "aspect_ratios": self.aspect_ratios}

    def table(self) -> str:
        """The statistics as a markdown table (the paper's Table 1 columns, plus NE and TE)."""

        def span(r: tuple[int, int] | None) -> str:
            return "-" if r is None else (str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}")

        head = "| category | train | val | test | test good | test defect | types | H | W | NE | TE |"
        lines = [head, "|" + "---|" * 11]
        for c in self.categories:
            lines.append(
                f"| {c.category} | {c.train} | {c.validation} | {c.test} | {c.test_good} | {c.test_defect} | "
                f"{c.defect_types} | {span(c.height)} | {span(c.width)} | {span(c.regions)} | {span(c.types_per_image)} |"
            )
        total = lambda key: sum(getattr(c, key) for c in self.categories)  # noqa: E731
        lines.append(
            f"| all | {total('train')} | {total('validation')} | {total('test')} | {total('test_good')} | "
            f"{total('test_defect')} | {total('defect_types')} | | | | |"
        )
        return "\n".join(lines)


def _mask_stats(sample: Sample) -> tuple[float, int, list[float]]:
    """(area ratio, number of regions, per-region bbox width/height) of a defective sample."""
    mask = read_mask(sample.mask_path, expected_size=image_size(sample.image_path))
    labels, count = ndimage.label(mask, structure=_EIGHT)
    aspects = [(s[1].stop - s[1].start) / (s[0].stop - s[0].start) for s in ndimage.find_objects(labels)]
    return float(mask.mean()), int(count), aspects


def _span(values: list[int]) -> tuple[int, int] | None:
    return (min(values), max(values)) if values else None


def dataset_stats(
    root: str | Path, categories: list[str] | None = None, metadata: str | Path | None = None, workers: int = 4
) -> StatsReport:
    """Compute the statistics of a dataset folder (every mask is read once)."""
    root = Path(root)
    meta = image_metadata(root, metadata)
    report = StatsReport(str(root))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for cat in resolve_categories(list_categories(root), categories, root):  # codes and aliases too
            samples = [s for split in ("train", "validation", "test") for s in list_samples(root, cat, split)]
            sizes = list(progress(pool.map(lambda s: image_size(s.image_path), samples), desc=f"sizes {cat}",
                                  total=len(samples)))
            defective = [s for s in samples if s.label == 1]
            masks = list(progress(pool.map(_mask_stats, defective), desc=f"masks {cat}", total=len(defective)))
            types = [len(meta[key]["defect_types"]) for s in defective
                     if (key := s.image_path.relative_to(root).as_posix()) in meta and meta[key].get("defect_types")]
            report.categories.append(
                CategoryStats(
                    category=cat,
                    train=sum(s.split == "train" for s in samples),
                    validation=sum(s.split == "validation" for s in samples),
                    test_good=sum(s.split == "test" and s.label == 0 for s in samples),
                    test_defect=len(defective),
                    defect_types=len({s.defect for s in defective}),
                    height=_span([h for _, h in sizes]),
                    width=_span([w for w, _ in sizes]),
                    regions=_span([m[1] for m in masks]),
                    types_per_image=_span(types) if len(types) == len(defective) else None,
                )
            )
            report.area_ratios[cat] = [m[0] for m in masks]
            report.aspect_ratios[cat] = [a for m in masks for a in m[2]]
    return report


def _histogram(values: dict[str, list[float]], title: str, xlabel: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positive = [v for vs in values.values() for v in vs if v > 0]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if positive:
        low, high = min(positive), max(positive)
        if low == high:
            low, high = low / 2, high * 2
        bins = np.geomspace(low, high, 31)
        for cat, vs in values.items():
            if vs:
                ax.hist([v for v in vs if v > 0], bins=bins, histtype="step", linewidth=1.5, label=f"{cat} ({len(vs)})")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no defective images", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
    return path


def write_stats(report: StatsReport, out: str | Path, json_path: str | Path | None = None) -> list[Path]:
    """Write the two histograms (and optionally the JSON report) into ``out``; returns the PNG paths."""
    out = Path(out)
    paths = [
        _histogram(report.area_ratios, "Defect area ratio per defective image", "mask area / image area",
                   out / "defect_area_ratio.png"),
        _histogram(report.aspect_ratios, "Bounding-box aspect ratio per defect region", "width / height",
                   out / "bbox_aspect_ratio.png"),
    ]
    if json_path is not None:
        write_json(json_path, report.to_dict())
    return paths
