"""The demo page at `/` in a real headless Chromium (Debian's chromium + chromium-driver), driven
by Selenium: upload the cat photo, see a cat class on top, keep a screenshot as an artifact."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import CAT_LABELS, DATA

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("TIMMSERVE_ARTIFACTS", Path(__file__).parents[3] / "test-artifacts"))

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="timmserve-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=900,900"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_upload_a_photo_and_see_its_class(start_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = start_server("--max-batch-size", "1")
    browser.get(f"{server.url}/")
    assert browser.title == "timmserve"
    WebDriverWait(browser, 30).until(lambda d: "tf_efficientnet_lite0" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(DATA / "cat.jpg"))
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".row")) == 5)
    labels = [element.text for element in browser.find_elements(By.CSS_SELECTOR, ".label")]
    assert labels[0] in CAT_LABELS
    assert browser.find_element(By.ID, "status").text.endswith(" ms")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "browser-demo.png"))
