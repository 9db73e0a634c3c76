"""
The dashboard (meter/cloud/web/static/): its files as the package ships
them, and the page in a real headless Chromium against the real
`meter-cloud` plugin holding real readings, delivered by the real gateway
and devices; `meter demo --keep` leaving it running.
"""

from __future__ import annotations

import calendar
import datetime
import html.parser
import re
import shutil
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from meter.cloud.web import dashboard as dashboard_files
from meter.tools import browser
from meter.tools.processes import WEB_ON, Daemon
from meter.tools.suite import ANY_PORT, loadgen_summary

STATIC = Path(__file__).resolve().parent.parent / "meter" / "cloud" / "web" / "static"
ARTIFACTS = Path(__file__).resolve().parent.parent / "var" / "test-artifacts"

#: Readings a device's survey holds for a day: every 15 minutes.
READINGS = 96


class _Page(html.parser.HTMLParser):
    """
    What a CSP of script-src 'self' and style-src 'self' would refuse in a
    page: inline scripts, <style> elements, style attributes, event handler
    attributes.
    """

    def __init__(self):
        super().__init__()
        self.inline: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        names = dict(attrs)
        if tag == "script":
            self._in_script = True
            if "src" in names:
                self.scripts.append(names["src"])
            else:
                self.inline.append("<script> without src")
        if tag == "style":
            self.inline.append("<style>")
        for name in names:
            if name == "style" or name.startswith("on"):
                self.inline.append(f"<{tag} {name}=...>")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append("script text")


def test_the_page_has_nothing_inline_that_the_csp_refuses():
    page = _Page()
    page.feed((STATIC / "index.html").read_text())
    assert page.inline == []
    assert page.scripts == ["/static/vendor/uPlot.iife.min.js", "/static/app.js"]


def test_the_page_builds_no_html_from_text():
    # Everything from the API goes into the page as text (textContent,
    # attributes): never parsed as HTML.
    script = (STATIC / "app.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function", script)


def test_the_build_copied_the_pinned_chart_library_into_the_package():
    # `make` (npm ci, then the copy): the page's /static/vendor/ files.
    lock = (STATIC.parent.parent.parent.parent / "package-lock.json").read_text()
    version = re.search(r'"node_modules/uplot": \{\s*"version": "([^"]+)",\s*"integrity": "sha512-', lock)
    assert version is not None, "package-lock.json pins uplot with its integrity hash"
    library = (STATIC / "vendor" / "uPlot.iife.min.js").read_text()
    assert "uPlot" in library
    assert (STATIC / "vendor" / "uPlot.min.css").read_text().startswith(".uplot")


def test_a_dashboard_without_the_chart_library_says_what_is_missing_and_how_to_build_it(tmp_path):
    for name in dashboard_files.PAGE:
        (tmp_path / name).write_text("")
    why = dashboard_files.missing(tmp_path)
    assert why == (
        f"the dashboard cannot draw its charts: vendor/uPlot.iife.min.js, vendor/uPlot.min.css missing from "
        f"{tmp_path} (make vendor copies uPlot there from node_modules, after npm ci)"
    )
    (tmp_path / "vendor").mkdir()
    for name in dashboard_files.VENDOR:
        (tmp_path / name).write_text("")
    assert dashboard_files.missing(tmp_path) is None
    assert dashboard_files.missing(STATIC) is None


@pytest.fixture
def chromium():
    why = browser.missing()
    if why is not None:
        pytest.skip(f"no browser for the dashboard test: {why}")
    with browser.chromium(1280, 1000) as driver:
        yield driver


def seconds(stamp: str) -> int:
    """
    A stored reading's time as the page's charts hold it: its clock time
    read as UTC.
    """
    return calendar.timegm(datetime.datetime.fromisoformat(stamp).timetuple())


#: Each chart's own state: per series (after uPlot's x series) its label,
#: whether it is shown, its times where it has a value, and how many of the
#: canvas's pixels are of its colour (what was drawn, not merely kept).
CHART_STATE = """
const chart = window.meterCharts[arguments[0]];
const canvas = chart.ctx.canvas;
const pixels = chart.ctx.getImageData(0, 0, canvas.width, canvas.height).data;
const colours = window.meterColours.map((hex) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)));
const drawn = colours.map(() => 0);
for (let p = 0; p < pixels.length; p += 4) {
  colours.forEach((c, i) => {
    if (Math.abs(pixels[p] - c[0]) + Math.abs(pixels[p + 1] - c[1]) + Math.abs(pixels[p + 2] - c[2]) < 24) drawn[i]++;
  });
}
return chart.series.slice(1).map((series, i) => ({
  label: series.label,
  show: series.show,
  times: chart.data[0].filter((t, j) => chart.data[i + 1][j] !== null && chart.data[i + 1][j] !== undefined),
  drawn: drawn[i],
}));
"""


@pytest.mark.e2e
def test_the_dashboard_shows_the_fleet_and_plots_each_device(make_suite, chromium, tmp_path):
    # Devices 1-3 report yesterday (the last complete day); device 4 last
    # reported two days ago (a gateway takes days back to 62 hours before
    # the send, so two days back whatever the hour): stale.
    suite = make_suite(4, READINGS, deadline=1.0, cloud={"web": ANY_PORT})
    cloud = suite.start_cloud()
    suite.start_gateway(connected=True)
    today = datetime.date.today()
    yesterday, old_day = today - datetime.timedelta(days=1), today - datetime.timedelta(days=2)
    loadgen_summary(suite.start_fleet(yesterday, "1-3"))
    loadgen_summary(suite.start_fleet(old_day, "4"))
    suite.wait_stored(4 * READINGS, cloud)
    url = cloud.all_matching(WEB_ON)[-1].group(1) + "/"

    # A refresh each second, to see new readings arrive without a reload.
    chromium.get(url + "#devices=1,2,3,4&range=week&refresh=1")
    loaded = browser.wait_for_charts(chromium)
    assert loaded["error"] is None, loaded

    rows = chromium.execute_script(
        "return [...document.querySelectorAll('#devices tbody tr')].map((tr) => ({"
        " id: tr.dataset.device, stale: tr.dataset.stale === 'true',"
        " cells: [...tr.cells].map((td) => td.textContent.trim())}))"
    )
    assert [row["id"] for row in rows] == ["1", "2", "3", "4"]
    assert [row["cells"][2] for row in rows] == [suite.fleet[i] for i in (1, 2, 3, 4)]
    assert [row["cells"][4] for row in rows] == [str(READINGS)] * 4
    assert [row["stale"] for row in rows] == [False, False, False, True]
    assert rows[3]["cells"][3].endswith("stale") and not rows[0]["cells"][3].endswith("stale")
    assert rows[0]["cells"][3] == f"{yesterday.isoformat()} 23:45"

    expected = {i: [seconds(row[2]) for row in suite.expected_rows(day, [i])]
                for i, day in ((1, yesterday), (2, yesterday), (3, yesterday), (4, old_day))}
    for chart in ("temperature", "humidity"):
        series = chromium.execute_script(CHART_STATE, chart)
        assert [s["label"] for s in series] == [f"#{i} {suite.fleet[i]}" for i in (1, 2, 3, 4)]
        assert all(s["show"] for s in series)
        assert {i: s["times"] for i, s in zip((1, 2, 3, 4), series)} == expected
        assert all(s["drawn"] > 100 for s in series), [s["drawn"] for s in series]
    assert chromium.execute_script("return performance.getEntriesByName('meter:first-chart').length") == 1
    # Nothing refused by the Content-Security-Policy, no file missing, no
    # script error.
    assert [entry for entry in chromium.get_log("browser") if entry["level"] == "SEVERE"] == []

    shot = tmp_path / "dashboard.png"
    chromium.save_screenshot(str(shot))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "dashboard.png")
    print(f"dashboard screenshot: {ARTIFACTS / 'dashboard.png'}")

    # Today's readings land for device 1: the page, polling, plots them,
    # without a reload (which would forget this mark).
    chromium.execute_script("window.meterTestMark = 'before the new day'")
    loadgen_summary(suite.start_fleet(today, "1"))
    suite.wait_stored(5 * READINGS, cloud)
    both_days = expected[1] + [seconds(row[2]) for row in suite.expected_rows(today, [1])]
    shown = browser.wait_until(
        chromium, f"window.meterCharts.temperature.data[1].filter((v) => v != null).length === {2 * READINGS}"
    )
    assert shown["error"] is None, shown
    series = chromium.execute_script(CHART_STATE, "temperature")
    assert series[0]["times"] == both_days
    assert chromium.execute_script("return window.meterTestMark") == "before the new day"


@pytest.mark.e2e
def test_demo_keep_leaves_the_dashboard_running_until_interrupted(make_suite, tmp_path):
    suite = make_suite(4, cloud={"web": ANY_PORT})
    demo = Daemon(
        "demo", [sys.executable, "-m", "meter.tools.cli", "demo", "--keep", "--config", str(suite.config),
                 "--dir", str(tmp_path / "demo")],
        cwd=suite.root,
    )
    try:
        url = demo.wait_for(r"^The dashboard: (http://\S+)$", 60).group(1)
        with urllib.request.urlopen(url, timeout=10) as page:
            assert b"/static/app.js" in page.read()
        demo.process.send_signal(signal.SIGINT)
        assert demo.wait(30) == 0
    finally:
        demo.stop()
    assert demo.all_matching(r"^meter demo: the cloud stopped$"), demo.lines[-5:]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=10)
