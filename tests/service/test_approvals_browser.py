"""An officer approves a gate in the Airflow UI (headless Debian Chromium driven by Selenium)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .conftest import chromium_driver

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
DAG, GATE = "approval_probe", "approve_release"


@pytest.mark.browser
@pytest.mark.service
def test_officer_approves_in_required_actions_and_task_succeeds(service_factory):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium_driver()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        service = service_factory("sqlite")
        service.wait_dag(DAG, "origin_engineer")
        run_id = service.trigger(DAG, "origin_engineer")
        service.wait_parked(DAG, run_id, GATE)

        driver.get(service.url)
        driver.find_element(By.NAME, "username").send_keys("origin_officer")
        driver.find_element(By.NAME, "password").send_keys(service.passwords["origin_officer"])
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, 60).until(lambda d: "/auth/login" not in d.current_url)

        driver.get(f"{service.url}/required_actions")
        driver.find_element(By.PARTIAL_LINK_TEXT, "Release dataset origin-shared@probe").click()
        WebDriverWait(driver, 60).until(expected_conditions.url_contains(f"/tasks/{GATE}/required_actions"))
        driver.find_element(By.ID, "element_comment").send_keys("checked the sanitization report")
        approve = driver.find_element(By.XPATH, "//button[normalize-space()='Approve']")
        WebDriverWait(driver, 30).until(lambda d: approve.is_enabled())
        approve.click()

        deadline = time.monotonic() + 180
        while service.ti(DAG, run_id, "release").get("state") not in ("success", "failed"):
            assert time.monotonic() < deadline, "the release step did not finish after the approval"
            time.sleep(2)
        assert service.ti(DAG, run_id, GATE)["state"] == "success"
        assert service.ti(DAG, run_id, "release")["state"] == "success"
        driver.refresh()
        time.sleep(3)
        driver.save_screenshot(str(ARTIFACTS / "approval_in_browser.png"))
        released = service.home / "origin/state/released" / f"{run_id}.json"
        record = json.loads(released.read_text())
        assert record["user"] == "origin_officer"
        assert record["comment"] == "checked the sanitization report"
    except Exception:
        driver.save_screenshot(str(ARTIFACTS / "approval_in_browser_failure.png"))
        raise
    finally:
        driver.quit()
