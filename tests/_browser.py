"""A real headless Chromium for page tests: Debian's ``chromium`` driven by Playwright.

Never downloads a browser (no ``playwright install``): the system binary is launched through
Playwright's executable-path option with the flags that keep it off the network. A missing
browser or Playwright fails the tests loudly, in CI and locally: ``.ci/run`` installs
``chromium`` with apt, the ``dev`` extra brings ``playwright``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

CHROMIUM = os.environ.get("CLT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser_page():
    """``new_page()`` -> a fresh page of one Chromium context per test module; page errors and
    console errors are collected on ``page.errors``."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"no Chromium at {CHROMIUM}: install it (apt-get install -y chromium) or set "
                    f"CLT_CHROMIUM; the page tests need a real browser", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -c constraints.txt -e '.[dev]'",
                    pytrace=False)
    profile = tempfile.mkdtemp(prefix="clt-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 900})
        pages = []

        def new_page():
            page = context.new_page()
            page.errors = []
            page.on("pageerror", lambda exc: page.errors.append(str(exc)))
            page.on("console", lambda msg: page.errors.append(msg.text)
                    if msg.type == "error" else None)
            pages.append(page)
            return page

        try:
            yield new_page
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)
