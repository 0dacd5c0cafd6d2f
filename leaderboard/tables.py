"""Leaderboard tables: methods grouped by family, categories as columns, in md/csv/latex/html.

One table shows one protocol and one source selection: numbers from the MVTec protocol and from the
paper's legacy protocol are never put in one column. Cells are percentages with one decimal; per
column and metric the best value is bold and the second underlined (ranks are taken on the printed
values, so equal printed numbers share a mark); "-" marks a missing number. The Mean column is the
stored mean (the published one for reported rows), never recomputed here.

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
    if all(m in RUNTIME_METRICS for m in metrics):
        return "runtime"
    return "3cad-paper" if source == "reported" else "mvtec"


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
    metrics: tuple[str, ...]
    protocol: str
    source: str
    columns: list[str]
    rows: list[Row]

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
        """(row index, column, metric) -> 'best' or 'second', ranked on the printed numbers."""
        out: dict[tuple[int, str, str], str] = {}
        for column in self.columns:
            for metric in self.metrics:
                printed = {}
                for i, row in enumerate(self.rows):
                    value = row.values.get((column, metric))
                    if value is not None:
                        printed[i] = float(self.text(value, metric))
                distinct = sorted(set(printed.values()), reverse=metric not in LOWER_IS_BETTER)
                for rank, mark in zip(distinct[:2], ("best", "second")):
                    for i, v in printed.items():
                        if v == rank:
                            out[(i, column, metric)] = mark
        return out

    def title(self) -> str:
        names = "/".join(metric_label(m, self.protocol) for m in self.metrics)
        unit = "%" if all(self.percent(m) for m in self.metrics) else ", ".join(
            RUNTIME_METRICS.get(m, "%") for m in self.metrics)
        return one_line(f"{names} ({unit}); protocol {self.protocol}; source {self.source}")

    def cell(self, index: int, column: str, style: str) -> str:
        """One cell, metrics joined by '/', each marked in ``style`` ('md', 'latex', 'html', 'plain')."""
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
        self._marks = self.marks()
        return getattr(self, f"_render_{fmt}")()

    def _render_md(self) -> str:
        header = ["Family", "Method", *(md_escape(category_label(c)) for c in self.columns)]
        lines = [md_escape(self.title()), "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---", "---"] + [":-:"] * len(self.columns)) + "|"]
        previous = None
        for i, row in enumerate(self.rows):
            family = row.family if row.family != previous else ""
            previous = row.family
            cells = [md_escape(family), row.md_name(), *(self.cell(i, c, "md") for c in self.columns)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def _render_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["family", "method", "source", "protocol",
                         *(csv_cell(f"{category_label(c)}/{m}") for c in self.columns for m in self.metrics)])
        for row in self.rows:  # names guarded; the numbers (digits or "-") are ours
            writer.writerow([*map(csv_cell, (row.family, row.name, row.source, self.protocol)),
                             *(self.text(row.values.get((c, m)), m) for c in self.columns for m in self.metrics)])
        return buffer.getvalue()

    def _render_latex(self) -> str:
        esc = latex_escape
        lines = [
            "% " + self.title(),
            "\\begin{tabular}{ll" + "c" * len(self.columns) + "}",
            "\\toprule",
            " & ".join(["Family", "Method", *(esc(category_label(c)) for c in self.columns)]) + " \\\\",
        ]
        previous = None
        for i, row in enumerate(self.rows):
            if row.family != previous:
                lines.append("\\midrule")
            family = esc(row.family) if row.family != previous else ""
            previous = row.family
            lines.append(" & ".join([family, esc(row.name), *(self.cell(i, c, "latex") for c in self.columns)])
                         + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"

    def _render_html(self) -> str:
        head = "".join(f"<th>{_html(h)}</th>" for h in ["Family", "Method", *map(category_label, self.columns)])
        body = []
        for i, row in enumerate(self.rows):
            cells = [f"<td>{_html(row.family)}</td>", f"<td>{_html(row.name)}</td>"]
            for c in self.columns:
                sort_key = row.values.get((c, self.metrics[0]))
                key = "" if sort_key is None else f"{sort_key:.6f}"
                note = _html(f"{category_label(c)}; protocol {self.protocol}; source {row.source}")
                cells.append(f'<td data-sort="{key}" title="{note}">{self.cell(i, c, "html")}</td>')
            body.append(f'<tr data-source="{_html(row.source)}">' + "".join(cells) + "</tr>")
        return (
            f'<table class="leaderboard" data-protocol="{_html(self.protocol)}">'
            f"<caption>{_html(self.title())}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>" + "".join(body) + "</tbody></table>\n"
        )


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
) -> Table:
    """Arrange store result rows (see :meth:`leaderboard.store.Store.results`) into a :class:`Table`.

    Rows are keyed by submission; two submissions that would print the same label get their sha256
    prefix appended. With ``source='all'`` reported rows are labelled as such.
    """
    protocol = protocol or default_protocol(source, metrics)
    picked = [
        r for r in results
        if r["protocol"] == protocol and r["metric"] in metrics and (source == "all" or r["source"] == source)
    ]
    rows: dict[str, Row] = {}
    labels: dict[str, str] = {}
    seen_categories: set[str] = set()
    for r in picked:
        # Reported numbers of one method form one row whatever their pseudo-submission.
        key = f"reported:{r['method']}" if r["source"] == "reported" else r["submission_sha256"]
        if key not in rows:
            tags = ["paper"] if source == "all" and r["source"] == "reported" else []
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
        if source in ("reported", "all") and protocol == "3cad-paper":
            for c in CATEGORIES:  # the paper's tables always show all eight columns
                if c.folder not in categories:
                    categories.append(c.folder)
            categories.sort(key=lambda c: (_CODE_ORDER.get(c, 99), c))
    columns = [*categories, MEAN]
    ordered = sorted(rows.values(), key=lambda row: FAMILY_ORDER.index(row.family))  # stable: keeps input order
    return Table(tuple(metrics), protocol, source, columns, ordered)


def render_table(
    store,
    metric: str | None = None,
    pair: str | None = None,
    protocol: str | None = None,
    fmt: str = "md",
    source: str = "reported",
    methods: list[str] | None = None,
) -> str:
    """What ``3cad leaderboard table`` prints."""
    metrics = parse_metrics(metric, pair)
    results = store.results(source=source, metrics=metrics, methods=methods)
    table = build_table(results, metrics, protocol, source)
    if not table.rows:
        return f"{table.title()}\n(no results: nothing stored for this protocol, source and metric)\n"
    return table.render(fmt)
