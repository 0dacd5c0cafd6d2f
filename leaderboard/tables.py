"""Leaderboard tables: one section per dataset, methods grouped by family, categories as columns,
in md/csv/latex/html.

One table shows one protocol and one dataset: numbers from the MVTec protocol and from the paper's
legacy protocol are never put in one column, and results on different datasets are never ranked
together (:func:`group_by_dataset`: the paper's rows and every evaluated row on 3CAD form the 3CAD
section; any other dataset is told apart by its fingerprint). Cells are percentages with one
decimal; per column and metric the best value of the section is bold and the second underlined
(ranks are taken on the printed values, so equal printed numbers share a mark); "-" marks a missing
number. The Mean column is the stored mean (the published one for reported rows), never recomputed
here; it is over the categories the entry has, and the table says how many (``Mean (n/N)`` or a
``mean over`` column), ranking only means over all N category columns.

Every name in a table (method, version, family, category) comes from a submission or an import, so
it is data, never markup: each format escapes it (:func:`md_escape`, :func:`latex_escape`,
``html.escape``, :func:`csv_cell`) after :func:`one_line` has made control characters visible.
"""

from __future__ import annotations

import csv
import html
import io
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from leaderboard.reported import DATASET as DATASET_3CAD
from leaderboard.reported import FAMILY_ORDER, family_of
from threecad.dataset.catalog import CATEGORIES
from threecad.errors import ThreecadError
from threecad.metrics import METRICS

MEAN = "mean"
FORMATS = ("md", "csv", "latex", "html")
#: Runtime numbers (protocol ``runtime``): lower is better and they are not percentages.
RUNTIME_METRICS = {"latency_ms": "ms/image", "peak_memory_mb": "MB", "throughput_ips": "images/s", "fit_s": "s"}
LOWER_IS_BETTER = {"latency_ms", "peak_memory_mb", "fit_s"}
_FOLDER_TO_CODE = {c.folder: c.code for c in CATEGORIES}
_CODE_ORDER = {c.folder: i for i, c in enumerate(CATEGORIES)}


# ---------------------------------------------------------------------------------------------- escaping
#: Bidirectional-override characters: they reorder how a terminal or browser shows the text after them.
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Characters Markdown (CommonMark/GFM) could read as markup inside a table cell; each gets a backslash.
MD_SPECIAL = "\\`*_[]<>|&~$"
#: LaTeX's special characters in text mode, and the commands that print them. ``<``, ``>`` and ``|``
#: are listed too: the default OT1 font encoding prints them as other glyphs.
LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#",
    "^": r"\textasciicircum{}", "_": r"\_", "%": r"\%", "~": r"\textasciitilde{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
}
#: A cell a spreadsheet would run as a formula starts with one of these (OWASP's list); it gets a
#: leading ``'``, which spreadsheets show as text. A cell already starting with ``'`` followed by one
#: of these (or by another ``'``) gets one too, so that :func:`csv_uncell` undoes the guard exactly.
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _invisible(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") or char in _BIDI


def text_problem(value: object, max_chars: int, allow: str = "") -> str | None:
    """Why ``value`` cannot be a stored name or note, or None: it must be a string of at most
    ``max_chars`` characters without control, line-separator, bidi-override or surrogate characters
    (those in ``allow``, e.g. newline and tab in free-text notes, excepted). Used where text first
    enters (``meta.json``), so every later view gets plain text."""
    if not isinstance(value, str):
        kind = {dict: "an object", list: "an array", bool: "true/false"}.get(type(value), "a number")
        return f"must be a string, not {kind}"
    if len(value) > max_chars:
        return f"is {len(value):,} characters long; the limit is {max_chars:,}"
    for position, char in enumerate(value):
        if _invisible(char) and char not in allow:
            return (f"contains the control character U+{ord(char):04X} at position {position}; "
                    "use plain one-line text")
    return None


def one_line(text: object) -> str:
    """``text`` on one line with every control, line-separator and bidi character shown as an escape
    (``\\n``, ``\\x1b``, ``\\u202e``): what a terminal or table prints is the text, not its effects."""
    text = "" if text is None else str(text)
    if not any(_invisible(c) for c in text):
        return text
    return "".join(_NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   if _invisible(c) else c for c in text)


def md_escape(text: object) -> str:
    """One Markdown table cell showing ``text`` literally (:data:`MD_SPECIAL` backslash-escaped)."""
    return "".join("\\" + c if c in MD_SPECIAL else c for c in one_line(text))


def latex_escape(text: object) -> str:
    """``text`` for LaTeX text mode, each :data:`LATEX_SPECIAL` character replaced in one pass."""
    return "".join(LATEX_SPECIAL.get(c, c) for c in one_line(text))


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: a string starting with ``= + - @``, tab or CR
    (or with ``'`` followed by one of those or ``'``) gets a leading ``'``. Numbers pass unchanged;
    newlines are kept (the csv module quotes them)."""
    if isinstance(value, str) and value and (value.startswith(CSV_FORMULA_START) or _quoted(value)):
        return "'" + value
    return value


def csv_uncell(value: Any) -> Any:
    """Undo :func:`csv_cell` (``import`` reads back exactly what ``export`` was given)."""
    return value[1:] if isinstance(value, str) and _quoted(value) else value


def _quoted(value: str) -> bool:
    return value.startswith("'") and (value[1:2] == "'" or value[1:].startswith(CSV_FORMULA_START))


def _html(text: object) -> str:
    """Text for an HTML element or a quoted attribute (``& < > " '`` escaped)."""
    return html.escape(one_line(text), quote=True)


def metric_label(metric: str, protocol: str | None = None) -> str:
    if metric == "aupro":
        return "P-PRO" if protocol == "3cad-paper" else "AU-PRO"
    return {
        "i_auroc": "I-AUROC", "p_auroc": "P-AUROC", "p_ap": "AP", "i_f1max": "I-F1max", "p_f1max": "P-F1max",
        "latency_ms": "latency", "peak_memory_mb": "peak memory", "throughput_ips": "throughput", "fit_s": "fit time",
    }.get(metric, metric)


def category_label(category: str) -> str:
    if category == MEAN:
        return "Mean"
    return _FOLDER_TO_CODE.get(category, category)


def parse_metrics(metric: str | None = None, pair: str | None = None) -> tuple[str, ...]:
    """``--metric a[,b]`` or ``--pair a/b`` to a metric tuple (default: the paper's Table 3 pair)."""
    if metric and pair:
        raise ThreecadError("give either --metric or --pair, not both")
    text = pair or metric or "p_auroc/p_ap"
    parts = tuple(p.strip() for p in text.replace(",", "/").split("/") if p.strip())
    known = (*METRICS, *RUNTIME_METRICS)
    bad = [p for p in parts if p not in known]
    if bad or not parts:
        raise ThreecadError(f"unknown metric(s) {', '.join(bad) or text!r}; expected {', '.join(known)}")
    return parts

def default_protocol(source: str | None, metrics: tuple[str, ...]) -> str:
    """``runtime`` for runtime metrics; else ``mvtec`` for our own numbers alone and ``3cad-paper``
    (the only protocol the paper's numbers exist under) whenever reported rows are asked for."""
    if all(m in RUNTIME_METRICS for m in metrics):
        return "runtime"
    return "mvtec" if source == "evaluated" else "3cad-paper"


# ---------------------------------------------------------------------------------------------- datasets
#: What a table section is called when its rows carry neither a dataset name nor a fingerprint.
UNKNOWN_DATASET = "(not recorded)"
#: Hex digits of a fingerprint shown where a dataset is named by it (``list``, section titles).
FINGERPRINT_DIGITS = 12
#: ``list``'s fingerprint cell for the paper's rows: measured on the authors' copy, which has no fingerprint here.
AS_PUBLISHED = "as published"


def fingerprint_prefix(fingerprint: str | None) -> str | None:
    """The first :data:`FINGERPRINT_DIGITS` hex digits of ``sha256:<hex>`` (``None`` for none)."""
    if not fingerprint:
        return None
    return fingerprint.split(":", 1)[-1][:FINGERPRINT_DIGITS]


def dataset_text(record: dict[str, Any]) -> str:
    """An entry's dataset as ``list`` prints it: ``NAME sha256:PREFIX``, the prefix alone when the name
    is unknown (stores written before names were recorded), ``3CAD as published`` for the paper."""
    if record.get("source") == "reported":
        return f"{DATASET_3CAD} {AS_PUBLISHED}"
    prefix = fingerprint_prefix(record.get("dataset_fingerprint"))
    parts = [record.get("dataset_name"), prefix and f"sha256:{prefix}"]
    return " ".join(one_line(p) for p in parts if p) or "-"


@dataclass
class DatasetGroup:
    """The rows of one dataset: the unit a table section ranks within.

    ``key`` is ``3CAD`` for the paper's rows and every evaluated row on 3CAD (named so, or sharing
    the fingerprint of a row named so), ``fingerprint:<fp>`` for any other fingerprinted dataset
    (two copies with one folder name but different content never share a ranking), ``name:<name>``
    for a named dataset without fingerprint, and ``""`` for rows with neither.
    """

    key: str
    names: list[str] = field(default_factory=list)
    fingerprints: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_3cad(self) -> bool:
        return self.key == DATASET_3CAD

    @property
    def label(self) -> str:
        """``3CAD``, ``NAME [PREFIX]``, ``PREFIX`` (name unknown), ``NAME`` (no fingerprint) or
        :data:`UNKNOWN_DATASET`; one copy under several folder names lists them joined by ``/``."""
        if self.is_3cad:
            return DATASET_3CAD
        name = " / ".join(self.names)
        prefix = fingerprint_prefix(self.fingerprints[0]) if self.fingerprints else None
        if name and prefix:
            return f"{name} [{prefix}]"
        return name or prefix or UNKNOWN_DATASET

    def matches_name(self, query: str) -> bool:
        wanted = query.strip().casefold()
        return wanted in {n.casefold() for n in (*self.names, self.label)} or (self.is_3cad and wanted == "3cad")

    def matches_fingerprint(self, query: str) -> bool:
        digits = query.strip().lower().split(":", 1)[-1]
        return bool(digits) and any(fp.lower().split(":", 1)[-1].startswith(digits) for fp in self.fingerprints)


def _dataset_key(row: dict[str, Any], full_3cad: set[str]) -> str:
    fingerprint, name = row.get("dataset_fingerprint"), row.get("dataset_name")
    if row.get("source") == "reported" or name == DATASET_3CAD or (fingerprint and fingerprint in full_3cad):
        return DATASET_3CAD
    if fingerprint:
        return f"fingerprint:{fingerprint}"
    return f"name:{name}" if name else ""


def group_by_dataset(results: list[dict[str, Any]]) -> list[DatasetGroup]:
    """Store result rows split by dataset (see :class:`DatasetGroup`): 3CAD first, then by label,
    rows without any dataset information last."""
    full_3cad = {r["dataset_fingerprint"] for r in results
                 if r.get("dataset_name") == DATASET_3CAD and r.get("dataset_fingerprint")}
    groups: dict[str, DatasetGroup] = {}
    for row in results:
        key = _dataset_key(row, full_3cad)
        group = groups.setdefault(key, DatasetGroup(key))
        group.rows.append(row)
        name, fingerprint = row.get("dataset_name"), row.get("dataset_fingerprint")
        if name and name not in group.names and not group.is_3cad:
            group.names.append(name)
        if fingerprint and fingerprint not in group.fingerprints:
            group.fingerprints.append(fingerprint)
    for group in groups.values():
        group.names.sort()
        group.fingerprints.sort()
    return sorted(groups.values(), key=lambda g: (not g.is_3cad, g.key == "", g.label.casefold(), g.key))


def select_dataset(groups: list[DatasetGroup], query: str) -> DatasetGroup:
    """The one group ``query`` names: a dataset name (any case; ``3CAD`` for the paper's section) or
    a fingerprint prefix (with or without ``sha256:``). An unknown or ambiguous query is an error
    listing what the store holds."""
    found = [g for g in groups if g.matches_name(query)] or [g for g in groups if g.matches_fingerprint(query)]
    listing = "; ".join(one_line(g.label) for g in groups) or "none"
    if not found:
        raise ThreecadError(f"no dataset {one_line(query)!r} in the store; datasets: {listing}")
    if len(found) > 1:
        raise ThreecadError(f"dataset {one_line(query)!r} is ambiguous: it names "
                            f"{'; '.join(one_line(g.label) for g in found)}; give a longer fingerprint prefix")
    return found[0]


# ---------------------------------------------------------------------------------------------- tables
#: The pseudo-column that says, per row, how many categories its mean covers (only when rows differ).
MEAN_OVER = "mean over"


@dataclass
class Row:
    family: str
    label: str  # the entry's name: method and version as stored (data: every format escapes it)
    source: str
    values: dict[tuple[str, str], float | None] = field(default_factory=dict)  # (category, metric) -> value
    tags: list[str] = field(default_factory=list)  # ours, printed in brackets: "paper", a sha256 prefix

    @property
    def name(self) -> str:
        """The label as printed, tags included (``PaDiM [paper]``)."""
        return self.label + "".join(f" [{t}]" for t in self.tags)

    def md_name(self) -> str:
        """:attr:`name` for Markdown: the label and each tag's text escaped, our brackets kept."""
        return md_escape(self.label) + "".join(f" [{md_escape(t)}]" for t in self.tags)


@dataclass
class Table:
    """One dataset's rows under one protocol: every mark ranks rows of this table only.

    The Mean column is the stored mean, over the categories the entry has. The table says how many:
    its header reads ``Mean (n/N)`` when every row's mean covers the same ``n`` of the ``N`` category
    columns; otherwise a ``mean over`` column gives each row's ``n/N`` and only rows whose mean covers
    all ``N`` are ranked in the Mean column (a mean over fewer categories is not comparable).
    """

    metrics: tuple[str, ...]
    protocol: str
    source: str
    columns: list[str]
    rows: list[Row]
    dataset: str | None = None  # the section's dataset label (None: rows were not grouped)

    # ------------------------------------------------------------------ means
    @property
    def categories(self) -> list[str]:
        return [c for c in self.columns if c != MEAN]

    def count(self, row: Row) -> int:
        """Category columns where ``row`` has a number: what its stored mean is taken over."""
        return sum(any(row.values.get((c, m)) is not None for m in self.metrics) for c in self.categories)

    def has_mean(self, row: Row) -> bool:
        return any(row.values.get((MEAN, m)) is not None for m in self.metrics)

    def uniform_mean(self) -> bool:
        return len({self.count(r) for r in self.rows if self.has_mean(r)}) <= 1

    def mean_over(self, row: Row) -> str:
        return f"{self.count(row)}/{len(self.categories)}" if self.has_mean(row) else "-"

    def display_columns(self) -> list[str]:
        """The value columns as printed: categories, Mean, and :data:`MEAN_OVER` when counts differ."""
        return self.columns if self.uniform_mean() else [*self.columns, MEAN_OVER]

    def header(self, column: str) -> str:
        if column == MEAN_OVER:
            return "mean over"
        if column == MEAN:
            counts = {self.count(r) for r in self.rows if self.has_mean(r)}
            return f"Mean ({counts.pop()}/{len(self.categories)})" if len(counts) == 1 else "Mean"
        return category_label(column)

    # ------------------------------------------------------------------ cells
    def percent(self, metric: str) -> bool:
        return metric not in RUNTIME_METRICS

    def text(self, value: float | None, metric: str) -> str:
        if value is None:
            return "-"
        if self.percent(metric):
            return f"{round(value * 100, 6):.1f}"
        return f"{round(value, 6):.1f}"

    def marks(self) -> dict[tuple[int, str, str], str]:
        """(row index, column, metric) -> 'best' or 'second', ranked on the printed numbers; in the
        Mean column only rows whose mean covers every category column take part."""
        out: dict[tuple[int, str, str], str] = {}
        complete = {i for i, row in enumerate(self.rows) if self.count(row) == len(self.categories)}
        for column in self.columns:
            for metric in self.metrics:
                printed = {}
                for i, row in enumerate(self.rows):
                    value = row.values.get((column, metric))
                    if value is not None and (column != MEAN or i in complete):
                        printed[i] = float(self.text(value, metric))
                distinct = sorted(set(printed.values()), reverse=metric not in LOWER_IS_BETTER)
                for rank, mark in zip(distinct[:2], ("best", "second")):
                    for i, v in printed.items():
                        if v == rank:
                            out[(i, column, metric)] = mark
        return out

    def source_text(self) -> str:
        present = [s for s in ("reported", "evaluated") if any(r.source == s for r in self.rows)]
        return " and ".join(present) if present else self.source

    def title(self) -> str:
        names = "/".join(metric_label(m, self.protocol) for m in self.metrics)
        unit = "%" if all(self.percent(m) for m in self.metrics) else ", ".join(
            RUNTIME_METRICS.get(m, "%") for m in self.metrics)
        dataset = "" if self.dataset is None else f"; dataset {self.dataset}"
        return one_line(f"{names} ({unit}); protocol {self.protocol}; source {self.source_text()}{dataset}")

    def cell(self, index: int, column: str, style: str) -> str:
        """One cell, metrics joined by '/', each marked in ``style`` ('md', 'latex', 'html', 'plain')."""
        if column == MEAN_OVER:
            return self.mean_over(self.rows[index])
        marks = self._marks
        parts = []
        for metric in self.metrics:
            text = self.text(self.rows[index].values.get((column, metric)), metric)
            mark = marks.get((index, column, metric))
            if style == "html":
                text = html.escape(text)
            if mark and style != "plain":
                wrap = {
                    "md": ("**{}**", "<u>{}</u>"),
                    "latex": ("\\textbf{{{}}}", "\\underline{{{}}}"),
                    "html": ("<b>{}</b>", "<u>{}</u>"),
                }[style]
                text = wrap[0 if mark == "best" else 1].format(text)
            parts.append(text)
        return "/".join(parts)

    # ------------------------------------------------------------------ formats
    def render(self, fmt: str = "md") -> str:
        if fmt not in FORMATS:
            raise ThreecadError(f"unknown table format {fmt!r}; expected {', '.join(FORMATS)}")
        if fmt == "csv":
            return _render_csv([self])
        self._marks = self.marks()
        return getattr(self, f"_render_{fmt}")()

    def _render_md(self) -> str:
        columns = self.display_columns()
        header = ["Family", "Method", *(md_escape(self.header(c)) for c in columns)]
        lines = [md_escape(self.title()), "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---", "---"] + [":-:"] * len(columns)) + "|"]
        previous = None
        for i, row in enumerate(self.rows):
            family = row.family if row.family != previous else ""
            previous = row.family
            cells = [md_escape(family), row.md_name(), *(self.cell(i, c, "md") for c in columns)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def _render_latex(self) -> str:
        esc = latex_escape
        columns = self.display_columns()
        lines = [
            "% " + self.title(),
            "\\begin{tabular}{ll" + "c" * len(columns) + "}",
            "\\toprule",
            " & ".join(["Family", "Method", *(esc(self.header(c)) for c in columns)]) + " \\\\",
        ]
        previous = None
        for i, row in enumerate(self.rows):
            if row.family != previous:
                lines.append("\\midrule")
            family = esc(row.family) if row.family != previous else ""
            previous = row.family
            lines.append(" & ".join([family, esc(row.name), *(self.cell(i, c, "latex") for c in columns)])
                         + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"

    def _render_html(self) -> str:
        columns = self.display_columns()
        head = "".join(f"<th>{_html(h)}</th>" for h in ["Family", "Method", *map(self.header, columns)])
        dataset = "" if self.dataset is None else f"; dataset {self.dataset}"
        body = []
        for i, row in enumerate(self.rows):
            cells = [f"<td>{_html(row.family)}</td>", f"<td>{_html(row.name)}</td>"]
            for c in columns:
                if c == MEAN_OVER:
                    sort_key = self.count(row) if self.has_mean(row) else None
                else:
                    sort_key = row.values.get((c, self.metrics[0]))
                key = "" if sort_key is None else f"{sort_key:.6f}"
                note = _html(f"{self.header(c)}; protocol {self.protocol}; source {row.source}{dataset}")
                cells.append(f'<td data-sort="{key}" title="{note}">{self.cell(i, c, "html")}</td>')
            body.append(f'<tr data-source="{_html(row.source)}">' + "".join(cells) + "</tr>")
        return (
            f'<table class="leaderboard" data-protocol="{_html(self.protocol)}">'
            f"<caption>{_html(self.title())}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>" + "".join(body) + "</tbody></table>\n"
        )


def _render_csv(tables: list[Table]) -> str:
    """One CSV for any number of sections: a ``dataset`` and a ``mean_over`` column say which section
    a row belongs to and what its mean covers; a category a section does not have is an empty cell."""
    columns: list[str] = []
    for table in tables:
        columns += [c for c in table.categories if c not in columns]
    columns = [*sorted(columns, key=lambda c: (_CODE_ORDER.get(c, 99), c)), MEAN]
    metrics = tables[0].metrics if tables else ()
    protocol = tables[0].protocol if tables else ""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["family", "method", "source", "protocol",
                     *(csv_cell(f"{category_label(c)}/{m}") for c in columns for m in metrics), "dataset", "mean_over"])
    for table in tables:
        own = set(table.columns)
        for row in table.rows:  # names guarded; the numbers (digits or "-") are ours
            values = [table.text(row.values.get((c, m)), m) if c in own else "" for c in columns for m in metrics]
            writer.writerow([*map(csv_cell, (row.family, row.name, row.source, protocol)), *values,
                             csv_cell(table.dataset or ""), table.mean_over(row)])
    return buffer.getvalue()


def _row_label(result: dict[str, Any]) -> str:
    version = result.get("version")
    if result["source"] == "evaluated" and version:
        return f"{result['method']} ({version})"
    return result["method"]


def build_table(
    results: list[dict[str, Any]],
    metrics: tuple[str, ...] = ("p_auroc", "p_ap"),
    protocol: str | None = None,
    source: str = "reported",
    categories: list[str] | None = None,
    dataset: str | None = None,
) -> Table:
    """Arrange store result rows (see :meth:`leaderboard.store.Store.results`) of one dataset into a
    :class:`Table` (:func:`build_tables` splits rows by dataset first; ``dataset`` is its label).

    Rows are keyed by submission; two submissions that would print the same label get their sha256
    prefix appended. Reported rows are labelled ``[paper]`` when evaluated rows share their table.
    Under ``3cad-paper`` the 3CAD section (or any table holding the paper's rows) shows all eight
    category columns, as the paper's tables do.
    """
    protocol = protocol or default_protocol(source, metrics)
    picked = [
        r for r in results
        if r["protocol"] == protocol and r["metric"] in metrics and (source == "all" or r["source"] == source)
    ]
    mixed = len({r["source"] for r in picked}) > 1
    rows: dict[str, Row] = {}
    labels: dict[str, str] = {}
    seen_categories: set[str] = set()
    for r in picked:
        # Reported numbers of one method form one row whatever their pseudo-submission.
        key = f"reported:{r['method']}" if r["source"] == "reported" else r["submission_sha256"]
        if key not in rows:
            tags = ["paper"] if mixed and r["source"] == "reported" else []
            family = r.get("family") or family_of(r["method"])
            rows[key] = Row(family if family in FAMILY_ORDER else "other", _row_label(r), r["source"], tags=tags)
            labels[key] = rows[key].name
        rows[key].values[(r["category"], r["metric"])] = r["value"]
        seen_categories.add(r["category"])
    # Disambiguate equal labels of different submissions.
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    for key, row in rows.items():
        if counts[row.name] > 1 and not key.startswith("reported:"):
            row.tags.append(key[:8])
    if categories is None:
        categories = sorted((c for c in seen_categories if c != MEAN), key=lambda c: (_CODE_ORDER.get(c, 99), c))
        paper = dataset == DATASET_3CAD or any(r["source"] == "reported" for r in picked)
        if paper and protocol == "3cad-paper":
            for c in CATEGORIES:  # the paper's tables always show all eight columns
                if c.folder not in categories:
                    categories.append(c.folder)
            categories.sort(key=lambda c: (_CODE_ORDER.get(c, 99), c))
    columns = [*categories, MEAN]
    ordered = sorted(rows.values(), key=lambda row: FAMILY_ORDER.index(row.family))  # stable: keeps input order
    return Table(tuple(metrics), protocol, source, columns, ordered, dataset)


def build_tables(
    results: list[dict[str, Any]],
    metrics: tuple[str, ...] = ("p_auroc", "p_ap"),
    protocol: str | None = None,
    source: str = "all",
    dataset: str | None = None,
) -> list[Table]:
    """One :class:`Table` per dataset (:func:`group_by_dataset`) that has rows for this protocol,
    source and metrics; ``dataset`` (a name or fingerprint prefix, :func:`select_dataset`) keeps one.

    ``results`` should be every row of the store (any protocol), so that a dataset is recognised as
    3CAD by a fingerprint it shares with a row named 3CAD under another protocol.
    """
    groups = group_by_dataset(results)
    if dataset is not None:
        groups = [select_dataset(groups, dataset)]
    tables = [build_table(g.rows, metrics, protocol, source, dataset=g.label) for g in groups]
    return [t for t in tables if t.rows]


def render_tables(tables: list[Table], fmt: str = "md") -> str:
    """Sections one after the other (md, latex, html); CSV is one file with a ``dataset`` column."""
    if fmt not in FORMATS:
        raise ThreecadError(f"unknown table format {fmt!r}; expected {', '.join(FORMATS)}")
    if fmt == "csv":
        return _render_csv(tables)
    return "\n".join(t.render(fmt) for t in tables)


def render_table(
    store,
    metric: str | None = None,
    pair: str | None = None,
    protocol: str | None = None,
    fmt: str = "md",
    source: str = "all",
    methods: list[str] | None = None,
    dataset: str | None = None,
) -> str:
    """What ``3cad leaderboard table`` prints: one section per dataset, or the one ``dataset`` names."""
    metrics = parse_metrics(metric, pair)
    protocol = protocol or default_protocol(source, metrics)
    tables = build_tables(store.results(methods=methods), metrics, protocol, source, dataset)
    if not tables:
        empty = Table(metrics, protocol, source, [], [])
        where = "" if dataset is None else f" and dataset {one_line(dataset)}"
        return f"{empty.title()}\n(no results: nothing stored for this protocol, source{where} and metric)\n"
    return render_tables(tables, fmt)


# ---------------------------------------------------------------------------------------------- means
#: Protocols whose means ``3cad leaderboard means`` lists (runtime numbers are not averaged there).
MEAN_PROTOCOLS = ("3cad-paper", "mvtec")


def evaluated_means(results: list[dict[str, Any]], dataset: str | None = None) -> str:
    """Per dataset, each evaluated entry's stored means with the number of categories they cover.

    ``n/N``: the entry has ``n`` of the ``N`` categories of its dataset (all eight for 3CAD; else the
    categories any entry of that dataset has under the protocol). Each stored mean is compared with
    the mean of the entry's stored category values; a difference is printed, never hidden.
    """
    from threecad.metrics.evaluator import mean_of

    groups = group_by_dataset(results)
    if dataset is not None:
        groups = [select_dataset(groups, dataset)]
    lines = ["Evaluated means per dataset: each stored mean over the categories the entry has (n/N)"]
    for group in groups:
        evaluated = [r for r in group.rows if r["source"] == "evaluated" and r["protocol"] in MEAN_PROTOCOLS]
        if not evaluated:
            continue
        lines.append(f"dataset {one_line(group.label)}")
        for protocol in MEAN_PROTOCOLS:
            rows = [r for r in evaluated if r["protocol"] == protocol]
            seen = {r["category"] for r in rows if r["category"] != MEAN}
            total = len(seen | ({c.folder for c in CATEGORIES} if group.is_3cad else set()))
            entries: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                entries.setdefault(r["submission_sha256"], []).append(r)
            for sha, own in entries.items():
                values: dict[tuple[str, str], float | None] = {(r["category"], r["metric"]): r["value"] for r in own}
                have = sorted({c for c, _ in values if c != MEAN})
                cells = []
                for metric in (m for m in METRICS if any(k[1] == m for k in values)):
                    stored = values.get((MEAN, metric))
                    recomputed = mean_of([values.get((c, metric)) for c in have]) if have else None
                    text = "-" if stored is None else f"{100 * stored:.1f}"
                    if (stored is None) != (recomputed is None) or (
                            stored is not None and abs(stored - recomputed) > 5e-7):
                        again = "-" if recomputed is None else f"{100 * recomputed:.1f}"
                        text += f" (stored; its {len(have)} categories give {again})"
                    cells.append(f"{metric_label(metric, protocol)} {text}")
                label = one_line(_row_label(own[0]))
                lines.append(f"  {label} [{sha[:8]}]  protocol {protocol}  over {len(have)}/{total} categories: "
                             + ", ".join(cells))
    if len(lines) == 1:
        lines.append("(no evaluated entries" + ("" if dataset is None else f" for dataset {one_line(dataset)}")
                     + ")")
    return "\n".join(lines)


def means_report(store=None, dataset: str | None = None) -> str:
    """What ``3cad leaderboard means`` prints: the paper's published-mean check, then (given a store)
    :func:`evaluated_means` of its evaluated entries."""
    from leaderboard.reported import mean_check_report

    parts = [mean_check_report()]
    if store is not None:
        parts.append(evaluated_means(store.results(source="all"), dataset))
    return "\n\n".join(parts) + "\n"
