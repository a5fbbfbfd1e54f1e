"""Report page: escaped text, offline relative thumbnails, tables; rendered in headless Chromium."""
from __future__ import annotations

import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.report import tables
from stages.report.html import GalleryItem, render_report

CHROMIUM = Path("/usr/bin/chromium")
EVIL = '<script>alert("x")</script> & <b>bold</b>'


class Collect(HTMLParser):
    """Tags and attributes as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture()
def report(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    items = []
    for i in range(3):
        img = tmp_path / f"src{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (600, 900, 3), dtype=np.uint8)).save(img)
        overlay = tmp_path / f"ov{i}.png"
        Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(overlay)
        items.append(GalleryItem(img, overlay if i else None, f"critique {i} {EVIL}", [f"ref {EVIL}", "plain ref"],
                                 eat_score=5.5 if i else None, metrics={"CIDEr": 0.25, "SPICE_L": None}, image_id=f"id{i}"))
    metrics = {k: 0.1 for _, k in tables.COLUMNS} | {"SPICE": None}
    md = tables.to_markdown(tables.table_one("pccd", {f"run {EVIL}": metrics}), "Table I", "pccd", {"SPICE": "no jars"})
    render_report(tmp_path / "out", f"Report {EVIL}", {"Results": md}, items)
    return tmp_path / "out" / "index.html"


def test_text_is_escaped_and_page_is_offline(report: Path):
    page = report.read_text()
    parsed = Collect()
    parsed.feed(page)
    names = [t for t, _ in parsed.tags]
    assert "script" not in names and "link" in names  # the only link is the data: favicon
    assert "".join(parsed.text).count(EVIL) == 1 + 1 + 3 + 3 + 1  # title, h1, captions, references, table row
    urls = [a.get("src") or a.get("href") for t, a in parsed.tags if t in ("img", "link", "a")]
    assert all(u and not u.startswith(("http:", "https:", "//", "/")) for u in urls)


def test_thumbnails_are_small_relative_files(report: Path):
    parsed = Collect()
    parsed.feed(report.read_text())
    srcs = [a["src"] for t, a in parsed.tags if t == "img"]
    assert len(srcs) == 3 + 2
    for src in srcs:
        with Image.open(report.parent / src) as im:
            assert max(im.size) <= 256 and im.format == ("JPEG" if src.endswith(".jpg") else "PNG")
    assert sum(src.endswith(".png") for src in srcs) == 2


def test_tables_are_embedded(report: Path):
    parsed = Collect()
    parsed.feed(report.read_text())
    cells = [t for t, _ in parsed.tags if t == "td"]
    rows = len(tables.paper_rows("I", "pccd")) + 1
    assert len(cells) == rows * (2 + len(tables.TABLE_COLUMNS))
    assert any(a.get("class") == "ours" for t, a in parsed.tags if t == "tr")


def chromium_screenshot(page: Path, tmp: Path) -> tuple[Path, str]:
    shot = tmp / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
           f"--screenshot={shot}", "--window-size=1280,1600", "--enable-logging=stderr", "--v=0",
           page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return shot, proc.stdout + proc.stderr


def console_problems(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line or "net::ERR" in line or "Uncaught" in line]


@pytest.mark.browser
def test_page_renders_in_headless_chromium(report: Path, tmp_path: Path):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`; .ci/run does)")
    shot, log = chromium_screenshot(report, tmp_path)
    assert shot.exists(), log
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 5, "blank screenshot"
    assert console_problems(log) == [], log
    # the check can fail: a page that logs a console error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body>x<script>console.error('boom')</script></body></html>")
    _, bad_log = chromium_screenshot(bad, tmp_path / "bad")
    assert console_problems(bad_log), bad_log
