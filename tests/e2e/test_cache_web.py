"""The build cache's web page in headless Chromium (Debian's chromium + chromium-driver, via selenium):
a screenshot, the list newest first, a click through to a build page and to a download."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kernel_ci.cache.server.server import ServerConfig
from tests.cacheservice import Running, server_in_thread, sha

pytestmark = pytest.mark.slow

OLD_KEY = "0a" * 32
NEW_KEY = "0b" * 32
REAL_METADATA = Path(__file__).resolve().parents[2] / "out" / "build" / "metadata.json"
JUNIT = (
    b'<?xml version="1.0"?><testsuites><testsuite name="smoke-c"><testcase classname="smoke-c" name="boot"/>'
    b'<testcase classname="smoke-c" name="proc_ci_smoke"/><testcase classname="smoke-c" name="ptrace">'
    b'<failure message="expected 0, got -1">trace</failure></testcase></testsuite></testsuites>'
)


def _metadata() -> dict:
    if REAL_METADATA.is_file():
        return json.loads(REAL_METADATA.read_text())
    return {
        "kernel": {"version": "5.10.223", "release": "5.10.223-kci"},
        "series": ["ci-smoke"],
        "fragments": ["kconfig/base.config", "series ci-smoke: ci-smoke.config"],
        "ccache": {"hits": 166, "misses": 10, "hit_rate": 0.9432},
    }


def _publish(client: httpx.Client, key: str, bzimage: bytes, inputs: dict[str, str]) -> None:
    files = {"bzImage": bzimage, "config": b"CONFIG_X=y\n", "patches/ci-smoke.mbox": b"From 0000 Mon\n"}
    outputs = []
    for name, data in files.items():
        assert client.put(f"/api/v1/blobs/{sha(data)}", content=data).status_code in (200, 201)
        outputs.append({"name": name, "sha256": sha(data), "size": len(data)})
    doc = {"outputs": outputs, "inputs": inputs, "metadata": _metadata()}
    assert client.put(f"/api/v1/builds/{key}", json=doc).status_code == 201


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Running, bytes]]:
    bzimage = b"\x7fkernel image " * 5000
    with server_in_thread(ServerConfig(data=tmp_path / "data")) as server, server.client() as client:
        _publish(client, OLD_KEY, b"older kernel", {"source": "linux-5.10.223", "config:CONFIG_KASAN": "n"})
        time.sleep(0.01)
        _publish(client, NEW_KEY, bzimage, {"source": "linux-5.10.223", "config:CONFIG_KASAN": "y"})
        console = b"[    0.000000] Linux version 5.10.223-kci\n"
        for data in (JUNIT, console):
            client.put(f"/api/v1/blobs/{sha(data)}", content=data)
        run = {
            "junit": {"sha256": sha(JUNIT), "size": len(JUNIT)},
            "console": {"sha256": sha(console), "size": len(console)},
            "outcome": "test failure",
        }
        assert client.put(f"/api/v1/builds/{NEW_KEY}/runs/run-1", json=run).status_code == 201
        yield server, bzimage


@pytest.fixture
def browser(tmp_path: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("Debian's chromium and chromium-driver are needed (.ci/services.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    chrome.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield chrome, downloads
    finally:
        chrome.quit()


def test_the_page_lists_builds_and_a_click_downloads_the_kernel(site, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    server, bzimage = site
    chrome, downloads = browser
    chrome.get(server.url + "/")
    rows = chrome.find_elements(By.CSS_SELECTOR, "#builds tr")[1:]
    assert len(rows) == 2
    assert NEW_KEY[:16] in rows[0].text and OLD_KEY[:16] in rows[1].text  # newest first
    metadata = _metadata()
    assert metadata["kernel"]["version"] in rows[0].text
    assert "2 passed" in rows[0].text and "1 failed" in rows[0].text
    assert f"{metadata['ccache']['hit_rate']:.0%}" in rows[0].text
    screenshot = tmp_path / "cache-page.png"
    assert chrome.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    keep = Path(__file__).resolve().parents[2] / "out" / "screenshots"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, keep / "cache-page.png")  # for a human to look at

    rows[0].find_element(By.LINK_TEXT, "bzImage").click()
    target = downloads / "bzImage"
    deadline = time.monotonic() + 20
    while not target.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert target.is_file(), sorted(p.name for p in downloads.iterdir())
    assert hashlib.sha256(target.read_bytes()).hexdigest() == hashlib.sha256(bzimage).hexdigest()

    chrome.find_element(By.LINK_TEXT, NEW_KEY[:16]).click()
    assert chrome.current_url.endswith(f"/builds/{NEW_KEY}")
    body = chrome.find_element(By.TAG_NAME, "body").text
    assert "ptrace" in body and "expected 0, got -1" in body  # the failed test and its message
    assert "CONFIG_KASAN: n -> y" in body  # the miss diff against the nearest other build
    chrome.save_screenshot(str(keep / "build-page.png"))
    junit_link = chrome.find_element(By.LINK_TEXT, "JUnit XML").get_attribute("href")
    assert httpx.get(junit_link).content == JUNIT
