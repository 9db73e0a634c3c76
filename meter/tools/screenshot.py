"""
make screenshot: docs/dashboard.png, the README's picture of the
dashboard.  A small fleet's week (`meter loadgen`'s synthetic days, sent
through the real gateway to the real cloud on loopback; one device silent
for the last days, so stale) shown by headless Chromium
(L{meter.tools.browser}).

    python -m meter.tools.screenshot [PATH]     (default docs/dashboard.png)
"""

from __future__ import annotations

import datetime
import shutil
import sys
import tempfile
from pathlib import Path

from meter.tools import browser
from meter.tools.processes import WEB_ON
from meter.tools.suite import ANY_PORT, Suite, loadgen_summary

DEVICES = 12
#: Yesterday and the day before: a gateway takes days back to 62 hours
#: before their send.
DAYS = 2
#: The last device sends no reading of these last days: stale.
SILENT_DAYS = 1
VIEW = "#devices=1,2,3&range=day"
WINDOW = (1280, 1200)


def fill(suite: Suite, yesterday: datetime.date) -> int:
    """
    The L{DAYS} ending C{yesterday} through the suite's gateway: every device
    every day, but the last one not in the last L{SILENT_DAYS}.  The number
    of readings sent.
    """
    sent = 0
    for back in range(DAYS - 1, -1, -1):
        devices = DEVICES if back >= SILENT_DAYS else DEVICES - 1
        day = yesterday - datetime.timedelta(days=back)
        summary = suite.root / f"loadgen-{day}.json"
        # A seed a day: each day's weather of its own.
        command = suite.loadgen_command(summary, "--day", day.isoformat(), "--first-id", "1", "--devices",
                                        str(devices), "--readings", "96", "--seed", str(back + 1), "--spread", "0")
        loadgen_summary(suite.run(f"loadgen {day}", command))
        sent += devices * 96
    return sent


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "docs/dashboard.png")
    why = browser.missing()
    if why is not None:
        print(f"make screenshot: {why}", file=sys.stderr)
        return 1
    scratch = Path(tempfile.mkdtemp(prefix="meter-screenshot-"))
    suite = Suite(scratch, DEVICES, None, keys=True, deadline=2.0, device={}, cloud={"web": ANY_PORT})
    try:
        cloud = suite.start_cloud()
        suite.start_gateway(connected=True)
        suite.wait_stored(fill(suite, datetime.date.today() - datetime.timedelta(days=1)), cloud)
        url = cloud.all_matching(WEB_ON)[-1].group(1) + "/"
        with browser.chromium(*WINDOW) as driver:
            driver.get(url + VIEW)
            loaded = browser.wait_for_charts(driver)
            if loaded["error"] is not None:
                print(f"make screenshot: the dashboard failed: {loaded}", file=sys.stderr)
                return 1
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
    finally:
        suite.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
