"""The 3CAD paper's published results (Tables 3 and 4), kept verbatim as data.

The numbers were produced with the paper's own evaluation (the ``3cad-paper`` protocol: 256x256,
Gaussian-smoothed maps, per-image P-PRO), so they are stored under that protocol only and are never
compared in one column with numbers from the MVTec protocol. "-" in the paper (not reported) is
``None`` here.

Each published "Mean" is kept as printed. :func:`mean_checks` says whether it equals the mean of the
eight printed category values; it never replaces the published number.
"""

from __future__ import annotations

from dataclasses import dataclass

from threecad.dataset.catalog import CATEGORY_CODES, CATEGORY_FOLDERS

PROTOCOL = "3cad-paper"
PAPER = "3CAD (AAAI 2025), Tables 3 and 4"
#: The dataset of every published number (and the name of evaluated rows on a verified full 3CAD copy).
DATASET = "3CAD"

#: Method families as the paper groups them, in the paper's order.
FAMILIES: dict[str, tuple[str, ...]] = {
    "embedding-based": ("PaDiM", "FastFlow", "RD", "RD++", "SimpleNet", "CFRG"),
    "synthesis-based": ("DRAEM", "DeSTSeg"),
    "reconstruction-based": ("RealNet",),
    "unified": ("UniAD", "CRAD"),
}
FAMILY_ORDER: tuple[str, ...] = (*FAMILIES, "other")


#: Methods of this project that the paper does not list, with the family they belong to.
EXTRA_FAMILIES: dict[str, str] = {"patchcore": "embedding-based"}


def family_of(method: str) -> str:
    """The paper's family of a method (case-insensitive), ``"other"`` for methods it does not know."""
    if method.lower() in EXTRA_FAMILIES:
        return EXTRA_FAMILIES[method.lower()]
    for family, methods in FAMILIES.items():
        if method.lower() in (m.lower() for m in methods):
            return family
    return "other"


# Rows: method, then 9 "a/b" cells in the column order ACC AI AMF ANMF ANI AP CS IS Mean.
_TABLE3 = """\
PaDiM 85.5/-, 93.9/-, 92.6/-, 85.1/-, 87.6/-, 79.8/-, 87.8/-, 76.9/-, 86.1/-
FastFlow 77.1/-, 82.8/-, 68.5/-, 81.2/-, 78.5/-, 52.8/-, 71.2/-, 70.7/-, 72.8/-
RD 92.2/34.3, 96.8/8.0, 97.2/3.9, 92.5/1.9, 94.7/9.4, 87.4/1.8, 93.1/5.7, 84.8/4.7, 92.3/8.7
RD++ 91.1/32.9, 96.6/5.1, 97.4/5.3, 91.6/2.0, 95.4/12.5, 85.5/1.6, 93.1/6.8, 84.9/4.6, 91.9/8.8
SimpleNet 75.9/13.3, 95.4/13.0, 93.8/5.5, 69.6/0.4, 93.1/9.9, 66.7/0.7, 83.4/1.9, 81.5/5.3, 82.4/6.3
DRAEM 63.5/20.3, 94.8/20.4, 92.3/4.5, 74.6/1.8, 81.4/15.6, 69.5/1.2, 91.0/6.2, 76.9/4.9, 80.5/9.4
DeSTSeg 87.8/32.5, 96.9/12.5, 96.6/4.1, 94.8/5.8, 93.2/9.2, 77.1/2.2, 90.8/3.1, 86.9/8.1, 90.5/9.6
RealNet 81.0/-, 92.4/-, 89.3/-, 82.9/-, 89.8/-, 76.0/-, 81.1/-, 78.3/-, 83.8/-
UniAD 84.7/-, 94.6/-, 93.5/-, 88.0/-, 86.0/-, 81.4/-, 85.1/-, 80.9/-, 86.8/-
CRAD 92.9/-, 96.7/-, 97.0/-, 90.8/-, 92.8/-, 88.4/-, 91.0/-, 86.4/-, 92.0/-
CFRG 91.1/34.6, 97.5/24.6, 98.3/23.3, 95.9/13.1, 96.9/23.1, 88.2/2.5, 93.5/10.2, 85.9/9.3, 93.4/17.6
"""

_TABLE4 = """\
PaDiM 81.6/-, 96.1/-, 89.3/-, 67.1/-, 79.1/-, 79.5/-, 66.4/-, 63.5/-, 77.8/-
FastFlow 79.1/-, 89.5/-, 82.3/-, 63.0/-, 71.9/-, 71.3/-, 63.4/-, 64.3/-, 73.1/-
RD 90.6/82.7, 96.0/81.5, 89.5/82.1, 66.8/70.0, 81.8/81.3, 79.0/72.1, 74.0/77.1, 65.9/60.8, 80.4/75.9
RD++ 92.0/83.2, 95.5/86.5, 89.0/84.0, 70.0/65.7, 81.8/85.2, 80.5/70.8, 76.3/78.7, 67.7/63.8, 81.6/77.2
SimpleNet 81.6/54.8, 92.9/70.4, 85.1/73.0, 61.0/40.7, 76.9/64.7, 69.5/55.6, 71.5/55.3, 67.2/54.6, 75.7/58.7
DRAEM 80.4/-, 89.4/-, 73.3/-, 61.9/-, 78.5/-, 71.7/-, 68.1/-, 70.8/-, 74.3/-
DeSTSeg 91.9/79.7, 95.1/93.5, 93.1/85.9, 77.3/81.3, 87.5/75.1, 85.6/77.7, 70.4/66.5, 86.3/60.0, 85.9/77.4
RealNet 83.9/43.3, 90.7/70.4, 73.9/38.1, 66.6/27.7, 70.0/22.2, 70.4/40.1, 65.2/47.6, 64.3/13.1, 73.1/37.8
UniAD 82.4/-, 93.3/-, 87.4/-, 65.5/-, 86.4/-, 72.4/-, 56.8/-, 62.4/-, 75.8/-
CRAD 88.2/-, 92.6/-, 89.4/-, 69.0/-, 75.6/-, 82.7/-, 72.6/-, 64.2/-, 79.3/-
CFRG 93.9/84.6, 96.1/91.8, 94.5/90.6, 83.8/82.4, 90.7/88.4, 87.2/78.5, 77.2/78.5, 68.4/61.3, 86.5/82.0
"""

#: Table 3 holds P-AUROC/AP, Table 4 I-AUROC/P-PRO. The paper's per-image P-PRO is stored under the
#: ``aupro`` metric of the ``3cad-paper`` protocol (that protocol's definition of the region metric).
TABLE_PAIRS: dict[str, tuple[str, str]] = {"table3": ("p_auroc", "p_ap"), "table4": ("i_auroc", "aupro")}
COLUMNS: tuple[str, ...] = (*CATEGORY_CODES, "Mean")
MEAN = "mean"


@dataclass(frozen=True)
class ReportedCell:
    """One published number: percent with one decimal, exactly as printed (``None`` for "-")."""

    method: str
    column: str  # a category code or "Mean"
    metric: str
    percent: float | None


def _parse(text: str, metrics: tuple[str, str]) -> list[ReportedCell]:
    cells: list[ReportedCell] = []
    for line in text.strip().splitlines():
        method, rest = line.split(" ", 1)
        values = [v.strip() for v in rest.split(",")]
        if len(values) != len(COLUMNS):
            raise AssertionError(f"{method}: {len(values)} cells, expected {len(COLUMNS)}")
        for column, pair in zip(COLUMNS, values):
            for metric, raw in zip(metrics, pair.split("/")):
                cells.append(ReportedCell(method, column, metric, None if raw == "-" else float(raw)))
    return cells


def reported_cells(table: str | None = None) -> list[ReportedCell]:
    """All published cells (both tables, or ``table3``/``table4``), in the paper's row order."""
    out: list[ReportedCell] = []
    for name, text in (("table3", _TABLE3), ("table4", _TABLE4)):
        if table in (None, name):
            out.extend(_parse(text, TABLE_PAIRS[name]))
    return out


def methods() -> list[str]:
    """Methods in the paper's row order."""
    return [line.split(" ", 1)[0] for line in _TABLE3.strip().splitlines()]


def column_category(column: str) -> str:
    """Store category name for a table column: the 3CAD folder name, or ``mean``."""
    return MEAN if column == "Mean" else CATEGORY_FOLDERS[CATEGORY_CODES.index(column)]


def reported_rows() -> list[dict]:
    """Store rows (source ``reported``): values as fractions like the evaluator's, ``None`` skipped."""
    rows = []
    for cell in reported_cells():
        if cell.percent is None:
            continue
        rows.append(
            {
                "method": cell.method,
                "version": "paper",
                "family": family_of(cell.method),
                "category": column_category(cell.column),
                "protocol": PROTOCOL,
                "metric": cell.metric,
                "value": round(cell.percent / 100.0, 6),
            }
        )
    return rows


@dataclass(frozen=True)
class MeanCheck:
    method: str
    metric: str
    published: float
    mean_of_eight: float

    @property
    def difference(self) -> float:
        return round(self.published - self.mean_of_eight, 4)

    @property
    def status(self) -> str:
        """``equal`` (same at one decimal), ``rounding`` (within the 0.05 the rounded inputs allow) or
        ``differs`` (the published mean is not the mean of the printed values)."""
        if f"{self.mean_of_eight + 1e-9:.1f}" == f"{self.published:.1f}":
            return "equal"
        if abs(self.published - self.mean_of_eight) <= 0.05 + 1e-9:
            return "rounding"
        return "differs"


def mean_checks() -> list[MeanCheck]:
    """For every method and metric with all eight values published, compare the Mean column."""
    by_key: dict[tuple[str, str], dict[str, float | None]] = {}
    for cell in reported_cells():
        by_key.setdefault((cell.method, cell.metric), {})[cell.column] = cell.percent
    checks = []
    for (method, metric), values in by_key.items():
        eight = [values[c] for c in CATEGORY_CODES]
        if values.get("Mean") is None or any(v is None for v in eight):
            continue
        checks.append(MeanCheck(method, metric, values["Mean"], sum(eight) / len(eight)))
    return checks


def mean_check_report() -> str:
    """Plain-text summary of :func:`mean_checks` (lists every Mean that is not the mean of its row)."""
    checks = mean_checks()
    lines = [f"{PAPER}: published Mean vs mean of the eight printed category values"]
    counts = {s: sum(c.status == s for c in checks) for s in ("equal", "rounding", "differs")}
    lines.append(
        f"{len(checks)} means checked: {counts['equal']} equal at one decimal, "
        f"{counts['rounding']} within rounding (<= 0.05), {counts['differs']} differ"
    )
    for c in checks:
        if c.status != "equal":
            lines.append(
                f"  {c.method:<10} {c.metric:<8} published {c.published:.1f}  mean of eight "
                f"{c.mean_of_eight:.3f}  ({c.status}, difference {c.difference:+.3f})"
            )
    return "\n".join(lines)
