"""The browser tests' harness: Debian's headless Chromium driven by its chromedriver (selenium), against the service
served by a real uvicorn server on a loopback port (tests/conftest.py's `client`).

Nothing here downloads a browser or a driver: both come from the system (`apt-get install chromium
chromium-driver`; .ci/run does it). Without them the tests skip, unless LEDGER_TEST_REQUIRE_BROWSER=1 (CI), where
they fail. Selenium is synchronous and the server runs on the test's event loop, so each browser scenario runs in
a thread (`in_browser`) while the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from ledger_service.database import PROJECT_ROOT

T = TypeVar("T")

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DOCS_IMAGES = PROJECT_ROOT / "docs" / "images"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--window-size=1280,900",
    "--force-device-scale-factor=1",
    "--lang=en-US",
)


def _browser_binaries() -> tuple[str, str] | None:
    driver = shutil.which("chromedriver")
    browser = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    return None if driver is None or browser is None else (browser, driver)


def artifacts_dir() -> Path:
    path = Path(os.environ.get("LEDGER_TEST_ARTIFACTS") or PROJECT_ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Browser:
    """A Chromium with a fresh profile and download directory."""

    def __init__(self, driver: WebDriver, downloads: Path) -> None:
        self.driver = driver
        self.downloads = downloads
        self.base_url = ""

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def screenshot(self, name: str) -> None:
        """Save the page as console-<name>.png to the test artifacts, and with LEDGER_UPDATE_SCREENSHOTS=1 also to
        docs/images (the pictures docs/auditing.md shows), so a plain test run leaves the checkout as it was."""
        driver = self.driver
        height = driver.execute_script("return document.documentElement.scrollHeight")
        metrics = {"width": 1280, "height": min(max(int(height), 600), 2400), "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        try:
            png = driver.get_screenshot_as_png()
        finally:
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        directories = [artifacts_dir()]
        if os.environ.get("LEDGER_UPDATE_SCREENSHOTS") == "1":
            DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
            directories.append(DOCS_IMAGES)
        for directory in directories:
            (directory / f"console-{name}.png").write_bytes(png)

    def wait_for_download(self, suffix: str, timeout: float = 20) -> Path:
        """The downloaded file, once Chromium has finished writing it (polled, no fixed sleep)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [p for p in self.downloads.iterdir() if p.name.endswith(suffix)]
            partial = [p for p in self.downloads.iterdir() if p.name.endswith(".crdownload")]
            if done and not partial:
                return done[0]
            time.sleep(0.05)
        raise AssertionError(f"no {suffix} download within {timeout}s: {list(self.downloads.iterdir())}")


@pytest.fixture
def browser() -> Iterator[Browser]:
    binaries = _browser_binaries()
    if binaries is None:
        message = "Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("LEDGER_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    binary, driver_path = binaries
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's manager must never fetch a browser or a driver
    profile = Path(tempfile.mkdtemp(prefix="ledger-chromium-"))
    downloads = profile / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile / 'profile'}")
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "download.directory_upgrade": True,
            "safebrowsing.enabled": False,
        },
    )
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.set_page_load_timeout(30)
        yield Browser(driver, downloads)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def in_browser(browser: Browser, client: httpx.AsyncClient) -> Callable[[Callable[[Browser], T]], asyncio.Future[T]]:
    """Run a synchronous browser scenario in a thread, with the browser pointed at the test's server."""
    browser.base_url = str(client.base_url).rstrip("/")

    def run(scenario: Callable[[Browser], T]) -> asyncio.Future[T]:
        return asyncio.ensure_future(asyncio.to_thread(scenario, browser))

    return run
