"""``3cad leaderboard site OUT``: one self-contained static HTML page.

No external resources (no CDN, fonts or scripts): the tables are inline HTML, sorting is a few lines
of inline JavaScript, and the charts are PNGs drawn with matplotlib's Agg backend and embedded as
base64 data URIs, so the file can be mailed, archived or served from anywhere, offline.

The page has one section per dataset (3CAD first): published (``reported``) numbers and our own
evaluations on 3CAD share the 3CAD tables (the paper's rows marked ``[paper]``), other datasets get
their own tables, and the two protocols are never in one table. Every caption states protocol,
sources and dataset, and every cell repeats them in its ``title``.

Names come from submissions, so they are text, never markup: the tables escape them for HTML
(:mod:`leaderboard.tables`), and every string drawn by matplotlib goes through :func:`mpl_text`
(no mathtext, no ``_`` legend marker) inside :data:`_PLAIN_TEXT` (no LaTeX even where a
matplotlibrc turns ``text.usetex`` on).
"""

from __future__ import annotations

import base64
import functools
import html
import io
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from leaderboard import reported  # noqa: E402
from leaderboard.store import Store, opened_store  # noqa: E402
from leaderboard.tables import (  # noqa: E402
    build_table,
    category_label,
    group_by_dataset,
    metric_label,
    one_line,
)
from threecad.io import write_text  # noqa: E402

log = logging.getLogger(__name__)

PAIRS = (("p_auroc", "p_ap"), ("i_auroc", "aupro"), ("i_f1max", "p_f1max"))
RUNTIME_PAIR = ("latency_ms", "peak_memory_mb")
#: Matplotlib settings while drawing: stored names must never reach a LaTeX run.
_PLAIN_TEXT = {"text.usetex": False}

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table.leaderboard{border-collapse:collapse;margin:1em 0;font-size:13px}
table.leaderboard th,table.leaderboard td{border:1px solid #ccc;padding:3px 6px;text-align:center}
table.leaderboard th{background:#f0f0f0;cursor:pointer;user-select:none}
table.leaderboard th:after{content:" \\2195";color:#999}
table.leaderboard caption{text-align:left;font-weight:600;padding:4px 0}
table.leaderboard td:nth-child(-n+2){text-align:left}
.note{color:#555;font-size:13px} img.chart{max-width:100%;border:1px solid #eee;margin:6px 0}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}
"""

_JS = r"""
function sortTable(th){
  var table=th.closest('table'), body=table.tBodies[0], idx=Array.prototype.indexOf.call(th.parentNode.children, th);
  var asc=th.getAttribute('data-dir')!=='asc'; th.setAttribute('data-dir', asc?'asc':'desc');
  var rows=Array.prototype.slice.call(body.rows);
  rows.sort(function(a,b){
    var x=a.cells[idx].getAttribute('data-sort'), y=b.cells[idx].getAttribute('data-sort');
    if(x===null||y===null){x=a.cells[idx].textContent;y=b.cells[idx].textContent;return asc?x.localeCompare(y):y.localeCompare(x);}
    var fx=x===''?-Infinity:parseFloat(x), fy=y===''?-Infinity:parseFloat(y);
    return asc?fx-fy:fy-fx;});
  rows.forEach(function(r){body.appendChild(r);});
}
document.addEventListener('DOMContentLoaded',function(){
  var tables=document.querySelectorAll('table.leaderboard');
  document.querySelectorAll('table.leaderboard th').forEach(function(th){th.addEventListener('click',function(){sortTable(th);});});
  document.body.setAttribute('data-tables', tables.length);
  // Deep link to a sorted view: #sort-<table>-<column>[-asc], 0-based, e.g. #sort-0-10 (first table by Mean).
  var m=/^#sort-(\d+)-(\d+)(-asc)?$/.exec(location.hash);
  if(m&&tables[+m[1]]){var th=tables[+m[1]].tHead.rows[0].cells[+m[2]];
    if(th){if(!m[3]){th.setAttribute('data-dir','asc');} sortTable(th);}}
});
window.addEventListener('load',function(){
  var imgs=document.querySelectorAll('img.chart'), ok=0;
  imgs.forEach(function(i){if(i.complete&&i.naturalWidth>0){ok++;}});
  document.body.setAttribute('data-images-ok', ok);
  document.body.setAttribute('data-images', imgs.length);
});
"""


def mpl_text(text: object) -> str:
    """A stored name as matplotlib draws it literally.

    Matplotlib reads a string with an even number of unescaped ``$`` as mathtext (``Net $\\foo{$``
    fails to parse and the whole page with it); ``\\$`` is its escape for a literal dollar and no
    other backslash means anything outside math. A legend label starting with ``_`` is dropped
    silently, so such a name gets a leading space. Control characters are shown as escapes.
    """
    text = one_line(text).replace("$", "\\$")
    return " " + text if text.startswith("_") else text


def _plain_text(draw: Callable[..., str]) -> Callable[..., str]:
    """Run a chart function with :data:`_PLAIN_TEXT` in force, from the first artist to ``savefig``
    (tick labels are made at draw time and read the settings then)."""
    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        with matplotlib.rc_context(_PLAIN_TEXT):
            return draw(*args, **kwargs)

    return wrapper


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(data: str, alt: str) -> str:
    return f'<img class="chart" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _label(row: dict[str, Any]) -> str:
    version = row.get("version")
    return mpl_text(f"{row['method']} ({version})" if version else row["method"])


@_plain_text
def bar_chart(rows: list[dict[str, Any]], protocol: str, metrics: tuple[str, ...] = ("i_auroc", "p_auroc")) -> str:
    """Grouped bars: one group per category, one bar per evaluated entry, one panel per metric."""
    entries = sorted({(r["submission_sha256"], _label(r)) for r in rows}, key=lambda e: e[1])
    categories = sorted({r["category"] for r in rows if r["category"] != "mean"}) + ["mean"]
    values = {(r["submission_sha256"], r["category"], r["metric"]): r["value"] for r in rows}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.4), squeeze=False)
    width = 0.8 / max(1, len(entries))
    for ax, metric in zip(axes[0], metrics):
        for k, (sha, label) in enumerate(entries):
            heights = [values.get((sha, c, metric)) for c in categories]
            xs = [i + k * width - 0.4 + width / 2 for i in range(len(categories))]
            ax.bar(xs, [0 if h is None else 100 * h for h in heights], width, label=label)
        ax.set_xticks(range(len(categories)), [mpl_text(category_label(c)) for c in categories], rotation=30,
                      fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"{metric_label(metric, protocol)} (%)")
        ax.set_title(f"{metric_label(metric, protocol)}, protocol {protocol}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    return _png(fig)


@_plain_text
def curve_chart(curves: list[dict[str, Any]], labels: dict[str, str], category: str, protocol: str) -> str:
    """Pixel ROC and PRO curves (FPR <= 0.3) of every evaluated entry for one category."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for curve in curves:
        ax = axes[0] if curve["kind"] == "roc" else axes[1]
        label = labels.get(curve["submission_sha256"]) or mpl_text(curve["submission_sha256"][:8])
        ax.plot(curve["x"], curve["y"], lw=1.2, label=label)
    axes[0].plot([0, 1], [0, 1], color="#bbb", lw=0.8, ls="--")
    name = mpl_text(category_label(category))
    axes[0].set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"pixel ROC, {name}")
    axes[1].set(xlabel="false-positive rate", ylabel="PRO", title=f"PRO, {name}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(10)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"protocol {protocol}, source evaluated", fontsize=9)
    return _png(fig)


def _tables_html(rows: list[dict[str, Any]], pairs, protocol: str, source: str, label: str) -> list[str]:
    tables = [build_table(rows, pair, protocol, source, dataset=label) for pair in pairs]
    return [t.render("html") for t in tables if t.rows]


def _charts(evaluated: list[dict[str, Any]], curves: list[dict[str, Any]], label: str) -> list[str]:
    """Bar chart and ROC/PRO curves of one dataset's evaluated entries, per protocol."""
    labels = {r["submission_sha256"]: _label(r) for r in evaluated}
    charts = []
    for protocol in ("mvtec", "3cad-paper"):
        rows = [r for r in evaluated if r["protocol"] == protocol and r["metric"] in ("i_auroc", "p_auroc")]
        if rows:
            charts.append(f"<h4>Per-category results, protocol {protocol}, dataset {html.escape(one_line(label))}</h4>")
            charts.append(_img(bar_chart(rows, protocol), f"bar chart, protocol {protocol}"))
        chosen = [c for c in curves if c["protocol"] == protocol and c["submission_sha256"] in labels]
        for category in sorted({c["category"] for c in chosen}):
            charts.append(_img(curve_chart([c for c in chosen if c["category"] == category], labels, category,
                                           protocol), f"ROC and PRO curves, {category}, protocol {protocol}"))
    return charts


def build_site(store: Store | str | Path | None, out: str | Path, title: str = "threecad leaderboard") -> Path:
    """Write the page to ``out`` (a file, or ``<out>/index.html`` for a folder); returns its path.

    One section per dataset (:func:`leaderboard.tables.group_by_dataset`; 3CAD first, with the
    paper's rows and every evaluated 3CAD row in the same tables), and in it one table per protocol
    and metric pair, the runtime table and the charts: nothing is ranked across datasets.
    """
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / "index.html"
    with opened_store(store, readonly=True) as db:
        parts = [f"<h1>{html.escape(title)}</h1>",
                 f'<p class="note">Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from '
                 f"{html.escape(str(db.path))}. Percentages with one decimal; per column the best value is "
                 "<b>bold</b> and the second <u>underlined</u>; \"-\" means not available. Click a column "
                 "header to sort. <b>Protocol</b> <code>3cad-paper</code> is the 3CAD paper's own evaluation "
                 "(256x256, Gaussian-smoothed maps, per-image P-PRO); <code>mvtec</code> is the standard MVTec AD "
                 "definition at native resolution (AU-PRO up to FPR 0.3). <b>Source</b> <code>reported</code> "
                 "numbers are copied from the paper (marked [paper] beside our own); <code>evaluated</code> "
                 "numbers were computed here from submitted maps or standardized runs. Each <b>dataset</b> has its "
                 "own section and rankings; the two protocols are never mixed in one table. A Mean covers the "
                 "categories an entry has: the header says <i>Mean (n/N)</i>, or a <i>mean over</i> column gives "
                 "each row's count, and only means over all N categories are ranked.</p>"]
        curves = db.curves()
        evaluated_any = False
        for index, group in enumerate(group_by_dataset(db.results())):
            label = group.label
            section = []
            for protocol in ("3cad-paper", "mvtec"):
                tables = _tables_html(group.rows, PAIRS, protocol, "all", label)
                if not tables:
                    continue
                section.append(f'<h3 id="dataset-{index}-{protocol}">Protocol {protocol}</h3>')
                section.extend(tables)
                if protocol == reported.PROTOCOL and any(r["source"] == "reported" for r in group.rows):
                    section.append(f"<pre>{html.escape(reported.mean_check_report())}</pre>")
            runtime = _tables_html(group.rows, [RUNTIME_PAIR], "runtime", "evaluated", label)
            if runtime:
                section.append(f'<h3 id="dataset-{index}-runtime">Inference speed and memory (standardized runs, '
                               "source evaluated)</h3>")
                section.append('<p class="note">Batch 1 after warm-up; each timed pass includes the copy of the '
                               "image to the device and of the map back to the host. Memory: peak reserved by "
                               "PyTorch's CUDA allocator on a GPU, peak resident set size on a CPU. Hardware is "
                               "recorded per entry (see <code>3cad leaderboard list</code>).</p>")
                section.extend(runtime)
            evaluated = [r for r in group.rows if r["source"] == "evaluated"]
            evaluated_any = evaluated_any or bool(evaluated)
            charts = _charts(evaluated, curves, label)
            if charts:
                section.append(f"<h3>Charts of evaluated entries, dataset {html.escape(one_line(label))}</h3>")
                section.extend(charts)
            if section:
                prints = ", ".join(group.fingerprints) or ("as published" if group.is_3cad else "none recorded")
                parts.append(f'<h2 id="dataset-{index}">Dataset: {html.escape(one_line(label))}</h2>')
                parts.append(f'<p class="note">Fingerprint(s): {html.escape(one_line(prints))}</p>')
                parts.extend(section)
        if not evaluated_any:
            parts.append('<p class="note">No evaluated entries yet: submit maps with '
                         "<code>3cad leaderboard submit</code> or run <code>3cad leaderboard run</code>.</p>")
        page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{_CSS}</style><script>{_JS}</script></head>"
                "<body>\n" + "\n".join(parts) + "\n</body></html>\n")
        write_text(out, page)  # with the umask's mode, like every file threecad.io writes
        log.debug("wrote %s (%d KB)", out, len(page) // 1024)
        return out
