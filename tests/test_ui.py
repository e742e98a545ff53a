"""The web dashboard (/ui) in a real headless browser: Debian's chromium driven by Selenium
through Debian's chromedriver (tests/install-system-deps.sh installs both). One browser and
one control plane for the whole module; each test leaves the page on a known view.

``BLUEGREEN_UPDATE_SCREENSHOT=1`` makes the first test write docs/dashboard.png (the README's
picture); otherwise it goes to a temporary directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from harness import REPO_ROOT
from live_cp import TOKENS, LiveControlPlane, live_control_plane, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="needs Debian's chromium and chromium-driver (tests/install-system-deps.sh)"),
]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveControlPlane]:
    with live_control_plane(tmp_path_factory.mktemp("ui-cp")) as running:
        running.ok("PUT", "/v1/services/shop", {"domains": ["shop.example.com"], "prefix": "/"})
        running.ok("PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9001"]})
        running.ok("PUT", "/v1/services/shop/environments/green", {"version": "v2", "endpoints": ["127.0.0.1:9002"]})
        running.ok("PUT", "/v1/services/search", {"domains": ["search.example.com"], "prefix": "/"})
        running.ok("PUT", "/v1/services/search/environments/blue", {"version": "2026.11.3", "endpoints": ["127.0.0.1:9011"]})
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try to download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_dashboard(browser: Any, cp: LiveControlPlane, role: str, view: str = "services") -> None:
    browser.get(f"{cp.admin_url}/ui#view={view}&token={TOKENS[role]}")
    browser.refresh()  # a new document even if only the fragment changed
    wait_until(lambda: browser.find_element(By.ID, "who").text.endswith(f"({role})"), message="signed in")
    wait_until(lambda: browser.find_element(By.ID, "live").text == "live", message="live feed connected")


def card(browser: Any, service: str) -> Any:
    return browser.find_element(By.CSS_SELECTOR, f"article[data-service='{service}']")


def env_text(browser: Any, service: str, env: str) -> str:
    return str(card(browser, service).find_element(By.CSS_SELECTOR, f"[data-env='{env}']").text)


def test_page_shows_a_service_and_its_weights(browser: Any, cp: LiveControlPlane, tmp_path: Path) -> None:
    cp.ok("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 100, "green": 0}})
    open_dashboard(browser, cp, "operator")
    wait_until(lambda: env_text(browser, "shop", "blue") == "blue: v1 · 100%", message="blue weight shown")
    assert env_text(browser, "shop", "green") == "green: v2 · 0%"
    bar = card(browser, "shop").find_element(By.CSS_SELECTOR, "[data-testid=weights]")
    assert "blue v1 100%" in bar.text
    # The token left the address bar at once; it is kept for the tab only.
    assert "token" not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('bluegreen.token')") == TOKENS["operator"]
    target = REPO_ROOT / "docs" / "dashboard.png" if os.environ.get("BLUEGREEN_UPDATE_SCREENSHOT") else tmp_path / "dashboard.png"
    # A deployment under way (left running: its steps last 15 minutes) for the picture.
    cp.ok("POST", "/v1/services/search/deployments", {"version": "2026.11.4", "endpoints": ["127.0.0.1:9012"],
                                                      "strategy": {"steps": [10, 50, 100], "step_seconds": 900}})
    wait_until(lambda: "shifting step 1/3" in card(browser, "search").find_element(By.CSS_SELECTOR, "[data-testid=phase]").text,
               timeout=30, message="the deployment's step shown")
    assert browser.save_screenshot(str(target))


def test_a_traffic_change_appears_without_a_reload(browser: Any, cp: LiveControlPlane) -> None:
    open_dashboard(browser, cp, "operator")
    browser.execute_script("window.sameDocument = 'yes'")
    cp.ok("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 30, "green": 70}})
    wait_until(lambda: env_text(browser, "shop", "green").endswith(" · 70%"), message="new weights pushed to the page")
    assert env_text(browser, "shop", "blue").endswith(" · 30%")
    assert browser.execute_script("return window.sameDocument") == "yes"  # no reload happened


def test_the_rollback_button_rolls_back(browser: Any, cp: LiveControlPlane) -> None:
    cp.ok("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 100, "green": 0}})
    cp.ok("POST", "/v1/services/shop/switch", {"to": "green"})
    open_dashboard(browser, cp, "operator")
    wait_until(lambda: env_text(browser, "shop", "green").endswith(" · 100%"), message="switched to green")
    # The page re-renders on every live event: find and click in one go, again if it was replaced.
    wait_until(lambda: card(browser, "shop").find_element(By.CSS_SELECTOR, "button[data-action=rollback]").click() or True,
               message="rollback button clicked")
    alert = wait_until(lambda: browser.switch_to.alert, message="confirmation asked")
    assert "roll back shop" in alert.text
    alert.accept()
    wait_until(lambda: cp.ok("GET", "/v1/services/shop")["traffic"]["weights"] == {"blue": 100, "green": 0},
               message="rolled back to blue")
    wait_until(lambda: env_text(browser, "shop", "blue").endswith(" · 100%"), message="rollback shown")
    history = [e["actor"] for d in cp.ok("GET", "/v1/services/shop/deployments")["deployments"] for e in d["history"]]
    assert "token:operator" in history  # the page used the user's token


def test_a_viewer_token_shows_no_buttons(browser: Any, cp: LiveControlPlane) -> None:
    open_dashboard(browser, cp, "viewer")
    wait_until(lambda: env_text(browser, "shop", "blue"), message="service shown")
    assert browser.find_elements(By.CSS_SELECTOR, "button[data-action]") == []
    # The server enforces the role whatever the page shows.
    status, _ = cp.call("POST", "/v1/services/shop/rollback", role="viewer")
    assert status == 403


def test_proxies_view_lists_fleets(browser: Any, cp: LiveControlPlane) -> None:
    open_dashboard(browser, cp, "viewer", view="proxies")
    wait_until(lambda: browser.find_element(By.ID, "view").text == "No proxy is connected.", message="empty proxies view")
