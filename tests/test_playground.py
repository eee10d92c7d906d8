"""The web playground end to end in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium; set
up by scripts/setup-browser.sh): the page loads from the server itself, shows /info, streams a completion as it is
generated, and shows errors. A screenshot is kept under .artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import REPO, ServerProcess, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is set up by scripts/setup-browser.sh")
if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
    pytest.skip("chromium/chromedriver missing: run scripts/setup-browser.sh", allow_module_level=True)

from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slow_server(tiny_model_dir, tmp_path_factory):
    """Long generations allowed, so that streaming is visible as it happens."""
    with ServerProcess(
        ["--model", str(tiny_model_dir), "--max-new-tokens", "1000", "--max-total-tokens", "1100"],
        free_port(),
        log_path=tmp_path_factory.mktemp("logs") / "playground.log",
    ) as srv:
        yield srv


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def fill(driver, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(value)


def test_playground_streams_a_completion(slow_server, browser):
    expected = slow_server.post("/generate", {"text": ["Deepspeed is"], "max_new_tokens": 200})[1]["text"][0]
    browser.get(slow_server.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.05)
    wait.until(lambda d: "tiny-bloom" in d.find_element(By.ID, "info").text)  # /info is shown
    assert "max_new_tokens" in browser.find_element(By.ID, "info").text
    fill(browser, "prompt", "Deepspeed is")
    fill(browser, "max_new_tokens", "200")
    fill(browser, "temperature", "0")
    # Record every change of the generated text, with its time, as the page makes it.
    browser.execute_script("""
        window.__changes = [];
        const out = document.getElementById('output');
        new MutationObserver(() => {
            const g = document.getElementById('generated');
            if (g) window.__changes.push([performance.now(), g.textContent.length]);
        }).observe(out, {subtree: true, childList: true, characterData: true});
    """)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 120, poll_frequency=0.1).until(lambda d: "finish:" in d.find_element(By.ID, "status").text)
    assert (
        browser.find_element(By.ID, "generated").text.strip() == expected.strip()
        or browser.execute_script("return document.getElementById('generated').textContent") == expected
    )
    changes = browser.execute_script("return window.__changes")
    lengths = [n for _, n in changes]
    assert len({n for n in lengths if 0 < n < len(expected)}) >= 10, "the text did not grow step by step"
    growing = [t for t, n in changes if 0 < n < len(expected)]
    assert growing[-1] - growing[0] > 50, "all the text arrived at once"  # milliseconds of visible streaming
    assert browser.find_element(By.ID, "error").text == ""
    artifacts = REPO / ".artifacts"
    artifacts.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(artifacts / "playground.png"))


def test_playground_shows_errors(slow_server, browser):
    browser.get(slow_server.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.05)
    wait.until(lambda d: "tiny-bloom" in d.find_element(By.ID, "info").text)
    browser.execute_script("document.getElementById('max_new_tokens').removeAttribute('max')")
    fill(browser, "max_new_tokens", "5000")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "error").text)
    error = browser.find_element(By.ID, "error").text
    assert "422" in error and "max_new_tokens" in error and "1000" in error
    browser.save_screenshot(str(REPO / ".artifacts" / "playground-error.png"))
