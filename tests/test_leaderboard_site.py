"""The static HTML page: self-contained, states protocol and source, renders in headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import cli
from leaderboard.site import build_site
from leaderboard.store import Store

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CATEGORIES = ("Aluminum_Camera_Cover", "Aluminum_Ipad")


def _fill(store: Store) -> None:
    for i, method in enumerate(("Alpha", "Beta")):
        rows, curves = [], []
        for protocol in ("mvtec", "3cad-paper"):
            for c, category in enumerate([*CATEGORIES, "mean"]):
                for metric in ("i_auroc", "p_auroc", "aupro", "p_ap", "i_f1max", "p_f1max"):
                    rows.append({"category": category, "protocol": protocol, "metric": metric,
                                 "value": 0.5 + 0.1 * i + 0.05 * c})
            for category in CATEGORIES:
                curves.append({"category": category, "protocol": protocol, "kind": "roc",
                               "x": [0, 0.2, 1], "y": [0, 0.7 + 0.1 * i, 1]})
                curves.append({"category": category, "protocol": protocol, "kind": "pro",
                               "x": [0, 0.1, 0.3], "y": [0, 0.4, 0.6 + 0.1 * i]})
        rows += [{"category": CATEGORIES[0], "protocol": "runtime", "metric": "latency_ms", "value": 10.0 + i},
                 {"category": CATEGORIES[0], "protocol": "runtime", "metric": "peak_memory_mb", "value": 300.0}]
        store.add_submission({"sha256": f"{i + 1:064x}", "method": method, "version": "1", "source": "evaluated",
                              "hardware": {"device": "cpu"}}, rows, curves)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("site")
    with Store(tmp / "lb.sqlite") as db:
        _fill(db)
        return build_site(db, tmp / "out")


def test_page_is_self_contained_and_labelled(page):
    text = page.read_text()
    parser = _Collect()
    parser.feed(text)
    for tag, attrs in parser.tags:  # nothing fetched from anywhere
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith("data:image/png;base64,"), (tag, attrs[key][:40])
    images = [a["src"] for t, a in parser.tags if t == "img"]
    # bar chart + 2 categories of curves, for each protocol
    assert len(images) == 2 * (1 + len(CATEGORIES))
    for src in images:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    captions = re.findall(r"<caption>(.*?)</caption>", text)
    # reported: 2 pairs (F1 not published); evaluated: 3 pairs x 2 protocols; runtime: 1
    assert len(captions) == 2 + 6 + 1
    assert all("protocol " in c and "source " in c for c in captions)
    cells = re.findall(r'<td data-sort="[^"]*" title="([^"]*)"', text)
    assert cells and all("protocol" in t and "source" in t for t in cells)
    # One section per dataset: the paper's 3CAD first, then the entries that recorded no dataset.
    assert text.index("Dataset: 3CAD</h2>") < text.index("Dataset: (not recorded)</h2>")
    assert all(c.endswith(("dataset 3CAD", "dataset (not recorded)")) for c in captions)
    assert "Protocol 3cad-paper</h3>" in text and "Protocol mvtec</h3>" in text
    assert page.stat().st_mode & 0o044  # readable by a web server


def test_cli_site(tmp_path):
    Store(tmp_path / "lb.sqlite").close()  # a new store: the paper's tables only
    result = CliRunner().invoke(cli, ["leaderboard", "site", str(tmp_path / "page.html"),
                                      "--store", str(tmp_path / "lb.sqlite")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "page.html").read_text()
    assert "No evaluated entries yet" in text and "CFRG" in text


def _dump_dom(url: str, profile: Path) -> str:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
            "--virtual-time-budget=5000", "--dump-dom", url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120).stdout


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian package `chromium`)")


@needs_chromium
def test_page_renders_in_headless_chromium(page, tmp_path):
    dom = _dump_dom(page.as_uri(), tmp_path / "profile")
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    attrs = dict(re.findall(r'(data-[a-z-]+)="(\d+)"', body.group(1)))
    # Set by the page's own script once loaded: tables found, images decoded with a non-zero width.
    assert int(attrs["data-tables"]) == 9
    assert int(attrs["data-images"]) == 6 and int(attrs["data-images-ok"]) == 6
    assert dom.count("<tr data-source=") >= 11 + 11 + 2 * 6 + 2


@needs_chromium
def test_sorting_script_orders_rows_in_chromium(page, tmp_path):
    """The first table (reported P-AUROC/AP) sorted by its Mean column through the page's deep link."""
    def mean_order(dom: str) -> list[float]:
        table = dom.split('<table class="leaderboard"', 2)[1]
        rows = re.findall(r"<tr data-source=.*?</tr>", table)
        return [float(re.sub(r"<[^>]+>", "", re.findall(r"<td[^>]*>(.*?)</td>", r)[-1]).split("/")[0]) for r in rows]

    unsorted = mean_order(_dump_dom(page.as_uri(), tmp_path / "p1"))
    descending = mean_order(_dump_dom(page.as_uri() + "#sort-0-10", tmp_path / "p2"))
    ascending = mean_order(_dump_dom(page.as_uri() + "#sort-0-10-asc", tmp_path / "p3"))
    assert unsorted != sorted(unsorted, reverse=True)  # the family order is not already the sorted order
    assert descending == sorted(unsorted, reverse=True) and descending[0] == 93.4  # CFRG's published mean
    assert ascending == sorted(unsorted)
