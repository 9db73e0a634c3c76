"""
Headless Chromium, driven through Debian's chromedriver with Selenium: the
dashboard's browser test, its benchmark and `make screenshot` look at the
page through it.  Selenium is given the browser and the driver, so it never
looks for (or downloads) either; `make browser` installs Debian's
C{chromium} and C{chromium-driver} when running as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

#: A browser that talks to nothing but the page it is given: no GPU, no
#: sandbox (it runs as root in CI), none of Chromium's own traffic.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)

#: How long a page's script may take to answer (an async script's timeout).
SCRIPT_TIMEOUT = 30.0

def missing() -> str | None:
    """
    Why the browser cannot run here, or None.
    """
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"no {path}: install Debian's {package} (make browser does, as root)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "no selenium: pip install -e '.[test]'"
    return None


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator:
    """
    A Selenium WebDriver of a fresh headless Chromium (its own profile in a
    temporary folder, removed at the end) with a window of C{width} by
    C{height} CSS pixels.
    """
    # Selenium Manager, asked for nothing, must not go online either.
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    why = missing()
    if why is not None:
        raise RuntimeError(why)
    profile = tempfile.mkdtemp(prefix="meter-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        driver.set_script_timeout(SCRIPT_TIMEOUT)
        driver.set_page_load_timeout(SCRIPT_TIMEOUT)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(driver, condition: str) -> dict:
    """
    Wait until the JavaScript expression C{condition} holds in the
    dashboard in C{driver}: now, or after one of its chart loads; what the
    page says then (as L{wait_for_charts}).  The script's timeout bounds it.
    """
    script = (
        "const done = arguments[arguments.length - 1];\n"
        f"const holds = () => {{ try {{ return Boolean({condition}); }} catch (e) {{ return false; }} }};\n"
        "const answer = () => ({loads: window.meterLoads || 0, error: window.meterLastError || null,\n"
        "                       status: document.getElementById('status').textContent});\n"
        "if (holds()) { done(answer()); return; }\n"
        "document.addEventListener('meter:charts', function seen() {\n"
        "  if (holds()) { document.removeEventListener('meter:charts', seen); done(answer()); }\n"
        "});\n"
    )
    return driver.execute_async_script(script)


def wait_for_charts(driver, loads: int = 1) -> dict:
    """
    Wait until the dashboard in C{driver} finished loading its charts
    C{loads} times (app.js counts them in C{window.meterLoads}, and
    announces each with a C{meter:charts} event): no polling.  What it says
    then: C{loads}, C{error} (the last load's failure, or None), C{status}
    (its status line).
    """
    return wait_until(driver, f"(window.meterLoads || 0) >= {int(loads)}")
