"""The live dashboard in headless Chromium: Debian's ``chromium`` driven through Debian's
``chromium-driver`` by selenium (scripts/bootstrap installs both; no browser is downloaded).

A real gateway process with real Kafka, real paho devices publishing in two bursts: the page
must show live numbers, and they must change between the two reads. A screenshot is saved
to the test's tmp dir (and to ``$TIDEGATE_DASHBOARD_SCREENSHOT`` when set, for docs/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.dev.kafka import KafkaState
from tests.harness import (
    REPO,
    Publisher,
    kafka_tls,
    running_gateway,
    wait_for,
    write_gateway_config,
)

pytestmark = pytest.mark.kafka

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DEVICES = [f"dash-{i}" for i in range(4)]
PER_BURST = 150


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    """Headless Chromium; fails (not skips) when the Debian packages are missing."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium and chromium-driver are missing: run scripts/bootstrap")
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must never fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root here
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1150",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(
        executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")
    )
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()


def _number(driver: object, element_id: str) -> int | None:
    from selenium.webdriver.common.by import By

    text = driver.find_element(By.ID, element_id).text.replace(",", "")  # type: ignore[attr-defined]
    return int(text) if text.isdigit() else None


def _dashboard_url(config: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "dashboard", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    assert url.startswith("http://127.0.0.1:"), url
    assert "/dashboard/#token=" in url, url
    return url


def test_dashboard_shows_live_numbers_in_headless_chromium(
    kafka: KafkaState, kafka_topic_factory, browser, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    events, dlq = kafka_topic_factory("events"), kafka_topic_factory("dlq", partitions=1)
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=kafka_tls(kafka),
        topics={"event": events, "dlq": dlq},
    )
    with running_gateway(config) as gateway:
        first = Publisher(gateway.mqtt_port, DEVICES).start(per_device=PER_BURST)
        first.wait_done(30)
        assert first.total_acked() == len(DEVICES) * PER_BURST
        burst = len(DEVICES) * PER_BURST
        gateway.wait_status(lambda s: s["kafka"]["forwarded"] >= burst, 30, "first burst in Kafka")

        driver.get(_dashboard_url(config))
        assert driver.title == "tidegate dashboard"
        wait_for(
            lambda: (_number(driver, "forwarded") or 0) >= burst,
            15,
            "the page to show the first burst forwarded",
            interval=0.2,
        )
        rows = wait_for(
            lambda: (
                len(driver.find_elements(By.CSS_SELECTOR, "#devices-table tbody tr"))
                == len(DEVICES)
            ),
            10,
            "one table row per device",
            interval=0.2,
        )
        assert rows
        table = driver.find_element(By.ID, "devices-table").text
        assert all(device in table for device in DEVICES), table
        assert driver.find_element(By.ID, "gateway-id").text == "gw-test"
        assert driver.find_element(By.ID, "kafka-state").text == "connected"
        assert driver.find_element(By.ID, "breaker-state").text == "closed"
        # With the token from the URL fragment the guarded lists load (empty here); they are
        # read after the numbers in each poll, so wait for the poll to complete.
        wait_for(
            lambda: (
                driver.find_element(By.ID, "conn-state").text == "live"
                and driver.find_element(By.ID, "drops-list").text == "none"
                and driver.find_element(By.ID, "dead-letters-list").text == "none"
            ),
            10,
            "the guarded lists to load with the token",
            interval=0.2,
        )
        assert not driver.find_element(By.ID, "token-hint").is_displayed()
        first_read = _number(driver, "forwarded")
        assert first_read is not None
        first_ingested = _number(driver, "ingested")
        assert first_ingested is not None
        assert first_ingested >= burst

        # Second burst: the same page, without reload, must show the numbers move.
        second = Publisher(gateway.mqtt_port, DEVICES).start(per_device=PER_BURST)
        second.wait_done(30)
        wait_for(
            lambda: (_number(driver, "forwarded") or 0) >= first_read + burst,
            20,
            "the page to show the second burst forwarded",
            interval=0.2,
        )
        assert (_number(driver, "ingested") or 0) >= first_ingested + burst
        per_device = [
            row.find_elements(By.TAG_NAME, "td")[3].text.replace(",", "")
            for row in driver.find_elements(By.CSS_SELECTOR, "#devices-table tbody tr")
        ]
        assert all(int(n) >= 2 * PER_BURST for n in per_device), per_device
        # The rate chart drew the forward series: pixels in its colour (#3ec27a).
        painted = driver.execute_script(
            "const c = document.getElementById('chart-rates');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "const near = (a, b) => Math.abs(a - b) < 48;"
            "let n = 0; for (let i = 0; i < d.length; i += 4)"
            "  if (d[i + 3] > 128 && near(d[i], 0x3e) && near(d[i + 1], 0xc2)"
            "      && near(d[i + 2], 0x7a)) n++;"
            "return n;"
        )
        assert painted > 20, painted

        screenshot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        target = os.environ.get("TIDEGATE_DASHBOARD_SCREENSHOT")
        if target:
            shutil.copyfile(screenshot, target)

        # No console errors (a blocked external asset or a script error would show here).
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors

        # Without the token the page still shows the counts, and says how to get the lists.
        admin = gateway.runtime["admin"]
        driver.get(f"http://{admin['host']}:{admin['port']}/")
        wait_for(
            lambda: (
                driver.find_element(By.ID, "token-hint").is_displayed()
                and (_number(driver, "forwarded") or 0) >= 2 * burst
            ),
            10,
            "the tokenless page",
            interval=0.2,
        )
        assert driver.current_url.endswith("/dashboard/")
