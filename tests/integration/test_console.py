"""The web console in real headless Chromium (Debian's chromium, driven by Debian's chromedriver
through Selenium; nothing is downloaded), against a real server: draw a digit with pointer events
and get the API's answer for the same pixels, upload a test digit, attack it, run an audit with the
admin token and open its report, the audit panel without a token, phone width, labels and keyboard
reach, and the page's security headers. Every view is saved as a screenshot under screenshots/console/
(ignored by git; ERC_SCREENSHOT_DIR moves it)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("ERC_SCREENSHOT_DIR", REPO / "screenshots")) / "console"
TOKEN = "console-admin-token-0123456789"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1500",
]


@pytest.fixture(scope="module")
def console_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory, start_server_fn):
    srv = start_server_fn(
        model_store,
        tmp_path_factory.mktemp("logs"),
        ERC_MODELS="tiny",
        ERC_DEFAULT_MODEL="tiny",
        ERC_ADMIN_TOKEN=TOKEN,
        ERC_AUDIT_DB=f"sqlite:///{tmp_path_factory.mktemp('audits')}/audits.db",
        ERC_AUDIT_MAX_N="500",
        # Progress reaches the job store at every heartbeat: often enough that the page (polling
        # every second) sees a few-second audit move on a quiet machine too.
        ERC_AUDIT_HEARTBEAT_S="0.3",
        ERC_EMBEDDING_MAP_N="500",
    )
    yield srv
    log = srv.log.read_text(errors="replace")
    assert srv.stop(), log[-3000:]
    assert "Traceback" not in log, log[-5000:]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    chromium = shutil.which("chromium")
    assert chromium and Path(CHROMEDRIVER).exists(), (
        "Debian's chromium and chromium-driver (make test installs them)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never runs, so nothing is fetched.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: webdriver.Chrome, until: Any, timeout: float = 120) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(until)


def js(driver: webdriver.Chrome, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def open_console(driver: webdriver.Chrome, url: str, path: str = "/") -> None:
    driver.get(url + path)
    wait(driver, lambda d: js(d, "return document.getElementById('model').value") == "tiny")
    wait(driver, lambda d: "test images" in d.find_element(By.ID, "map-caption").text)


def shot(driver: webdriver.Chrome, name: str) -> None:
    assert driver.save_screenshot(str(SHOTS / f"{name}.png"))


def page_errors(driver: webdriver.Chrome) -> list[str]:
    """Console errors (CSP violations among them) since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def draw_seven(driver: webdriver.Chrome) -> None:
    """A '7' through pointer events: press, a bar to the right, a diagonal down, release."""
    pad = driver.find_element(By.ID, "pad")
    chain = ActionChains(driver).move_to_element_with_offset(pad, -80, -90).click_and_hold()
    for _ in range(5):
        chain.move_by_offset(30, 0)
    for _ in range(8):
        chain.move_by_offset(-12, 25)
    chain.release().perform()


def click(driver: webdriver.Chrome, selector: str) -> bool:
    """Click what ``selector`` finds; False (try again) when the list re-rendered in between."""
    try:
        driver.find_element(By.CSS_SELECTOR, selector).click()
    except StaleElementReferenceException:
        return False
    return True


def png_of(driver: webdriver.Chrome, element_id: str) -> bytes:
    src = js(driver, "return document.getElementById(arguments[0]).src", element_id)
    assert src.startswith("data:image/png;base64,"), src[:40]
    return base64.b64decode(src.split(",", 1)[1])


def predict(url: str, png: bytes) -> dict:
    r = httpx.post(f"{url}/v1/models/tiny:predict", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def test_the_page_is_served_with_a_strict_policy_and_nothing_external(console_server) -> None:
    with console_server.client() as c:
        pages = [c.get(p) for p in ("/", "/console")]
        assets = {n: c.get(f"/console/{n}") for n in ("console.js", "console.css")}
        missing = c.get("/console/../settings.py")
    for r in pages:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        for directive in (
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ):
            assert directive in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
    assert pages[0].text == pages[1].text
    assert assets["console.js"].headers["content-type"].startswith("text/javascript")
    assert missing.status_code == 404
    html = pages[0].text
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(ref.startswith(("/console/", "#", "data:")) for ref in refs), refs
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html)), "no inline script"
    assert not re.search(r"<[^>]+\s(?:style|on[a-z]+)\s*=", html), "no inline styles or event handlers"
    for text in (html, assets["console.js"].text, assets["console.css"].text):
        assert not re.search(r"https?://", text), "nothing is fetched from elsewhere"


def test_draw_a_digit_and_get_the_apis_answer_for_the_same_pixels(console_server, browser) -> None:
    open_console(browser, console_server.url)
    draw_seven(browser)
    wait(browser, lambda d: d.find_element(By.ID, "prediction").get_attribute("data-label"))
    label = int(browser.find_element(By.ID, "prediction").get_attribute("data-label"))
    shown = js(browser, "return JSON.parse(document.getElementById('bars').dataset.probabilities)")
    sent = png_of(browser, "input-preview")  # the exact bytes the page sent
    answer = predict(console_server.url, sent)
    assert answer["label"] == label
    assert answer["probabilities"] == pytest.approx(shown, abs=1e-7)
    assert len(shown) == 10 and len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 10
    assert browser.find_element(By.ID, "typicality").text.startswith(("Typical", "Atypical"))
    shot(browser, "try-drawn")
    assert page_errors(browser) == []


def test_upload_a_test_digit_and_get_its_label(console_server, browser, mnist_sample, tmp_path: Path) -> None:
    # a test digit the model reads correctly, as the API says
    index = next(
        i
        for i, png in enumerate(mnist_sample.pngs)
        if predict(console_server.url, png)["label"] == mnist_sample.labels[i]
    )
    path = tmp_path / "digit.png"
    path.write_bytes(mnist_sample.pngs[index])
    open_console(browser, console_server.url)
    browser.find_element(By.ID, "upload").send_keys(str(path))
    wait(browser, lambda d: "uploaded digit.png" in d.find_element(By.ID, "input-caption").text)
    wait(browser, lambda d: d.find_element(By.ID, "prediction").get_attribute("data-label"))
    assert (
        int(browser.find_element(By.ID, "prediction").get_attribute("data-label"))
        == mnist_sample.labels[index]
    )
    assert png_of(browser, "input-preview") == mnist_sample.pngs[index]
    shot(browser, "try-uploaded")

    # attack it: the result panel shows both images, the perturbation and the verdict
    steps = browser.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("5")
    browser.find_element(By.ID, "smallest").click()
    eps = float(browser.find_element(By.ID, "eps").get_attribute("value"))
    browser.find_element(By.ID, "run-attack").click()
    wait(browser, lambda d: d.find_element(By.ID, "verdict").get_attribute("data-flipped"))
    flipped = browser.find_element(By.ID, "verdict").get_attribute("data-flipped") == "true"
    verdict = browser.find_element(By.ID, "verdict").text
    assert verdict.startswith("Flipped" if flipped else "Held")
    assert js(browser, "return document.getElementById('adv-img').naturalWidth") == 28
    assert js(browser, "return document.getElementById('clean-img').naturalWidth") == 28
    delta = js(
        browser,
        "const c = document.getElementById('delta');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)",
    )
    assert len(set(delta[0::4])) > 1, "the amplified perturbation is drawn"
    facts = browser.find_element(By.ID, "attack-facts").text
    assert "PGD-5" in facts and "smallest flipping eps" in facts
    shot(browser, "attack")
    # the API gives the same answer to the same request (same seed)
    params = {"eps": eps, "steps": 5, "restarts": 1, "seed": 0, "smallest_eps": "true"}
    r = httpx.post(
        f"{console_server.url}/v1/models/tiny:attack",
        params=params,
        content=mnist_sample.pngs[index],
        headers={"content-type": "image/png"},
        timeout=120,
    )
    res = r.json()["results"][0]
    assert res["flipped"] == flipped and base64.b64decode(res["adversarial"]["png"]) == png_of(
        browser, "adv-img"
    )
    assert res["adversarial"]["label_name"] in verdict
    assert page_errors(browser) == []


def test_without_a_token_the_audit_panel_says_what_is_needed(console_server, browser) -> None:
    open_console(browser, console_server.url, "/console#audits")
    js(browser, "sessionStorage.clear()")
    open_console(browser, console_server.url, "/console#audits")
    need = browser.find_element(By.ID, "audit-need").text
    assert "admin token" in need and "ERC_ADMIN_TOKEN" in need
    assert not browser.find_element(By.ID, "audit-panel").is_displayed()
    shot(browser, "audits-no-token")
    browser.find_element(By.ID, "token").send_keys("wrong-token")
    browser.find_element(By.ID, "use-token").click()
    wait(browser, lambda d: "refused" in d.find_element(By.ID, "audit-need").text)
    assert js(browser, "return sessionStorage.length") == 0
    assert not browser.find_element(By.ID, "audit-panel").is_displayed()
    page_errors(browser)  # the refused request is logged as a failed resource load


def test_with_the_token_start_an_audit_watch_it_run_and_open_its_report(console_server, browser) -> None:
    open_console(browser, console_server.url, "/#audits")
    js(browser, "sessionStorage.clear()")
    open_console(browser, console_server.url, "/#audits")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "use-token").click()
    wait(browser, lambda d: d.find_element(By.ID, "audit-panel").is_displayed())
    assert js(browser, "return sessionStorage.getItem('erc-admin-token')") == TOKEN
    # The attack list comes from GET /v1/attacks: PGD with its defaults (PGD-40).
    Select(browser.find_element(By.ID, "preset")).select_by_value("pgd")
    # about ten seconds of work here, so that the page polls it several times while it runs
    for field, value in (("audit-n", "150"), ("audit-eps", "0, 0.05, 0.1, 0.2, 0.3")):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    browser.find_element(By.ID, "start-audit").click()
    read = "const r = document.querySelector('#audit-table tbody tr'); return r && [r.dataset.status, r.querySelector('.audit-progress').dataset.fraction, r.cells[4].textContent]"
    wait(browser, lambda d: js(d, read))
    seen: list[tuple[str, str, str]] = []
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        row = tuple(js(browser, read))
        if not seen or row != seen[-1]:
            seen.append(row)
        if row[0] == "running" and len(seen) == 3:
            shot(browser, "audits-running")
        if row[0] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert seen[-1][0] == "done", seen
    moving = sorted({float(f) for s, f, _ in seen if s == "running" and f not in ("", "0")})
    # (A running audit may show 1.0 for the moment between its last attack and its report being written.)
    assert len(moving) >= 2 and 0 < moving[0] < moving[-1] <= 1, f"progress should move while running: {seen}"
    assert any(s == "running" and eta for s, _, eta in seen), "a running audit shows the time left"
    shot(browser, "audits-done")
    main = browser.current_window_handle
    wait(browser, lambda d: click(d, "#audit-table tbody tr button[data-action=report]"))
    wait(browser, lambda d: len(d.window_handles) == 2)
    browser.switch_to.window(next(h for h in browser.window_handles if h != main))
    try:
        wait(browser, lambda d: d.title == "Robustness audit: tiny")
        assert browser.current_url.startswith("blob:"), "the token never goes into a URL"
        # the report's styles apply under the console's policy (its one <style> block is allowed by hash)
        assert js(browser, "return getComputedStyle(document.body).maxWidth") == "1000px"
        assert js(browser, "return document.images.length") >= 1 and js(
            browser, "return Array.from(document.images).every(i => i.naturalWidth > 0)"
        )
        shot(browser, "report")
        assert page_errors(browser) == []
    finally:
        browser.close()
        browser.switch_to.window(main)
    urls = js(
        browser, "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href])"
    )
    assert not any(TOKEN in u for u in urls)

    # AutoAttack's standard suite is offered and accepted; cancelling it from the list works
    Select(browser.find_element(By.ID, "preset")).select_by_value("autoattack")
    for field, value in (("audit-n", "100"), ("audit-eps", "0, 0.3")):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    browser.find_element(By.ID, "start-audit").click()
    wait(
        browser,
        lambda d: (
            js(d, read)[0] in ("queued", "running") or "not started" in d.find_element(By.ID, "status").text
        ),
    )
    assert "not started" not in browser.find_element(By.ID, "status").text
    wait(browser, lambda d: click(d, "#audit-table tbody tr button[data-action=cancel]"))
    wait(browser, lambda d: js(d, read)[0] == "cancelled", timeout=60)
    shot(browser, "audits-cancelled")
    assert page_errors(browser) == []


def test_phone_width(console_server, browser) -> None:
    browser.set_window_size(390, 844)
    try:
        open_console(browser, console_server.url)
        width = js(browser, "return document.documentElement.clientWidth")
        assert js(browser, "return document.documentElement.scrollWidth") <= width, "no sideways scrolling"
        for el in ("pad", "map", "run-attack", "eps"):
            assert (
                js(browser, f"return document.getElementById('{el}').getBoundingClientRect().right") <= width
            )
        shot(browser, "phone")
        draw_seven(browser)
        wait(browser, lambda d: d.find_element(By.ID, "prediction").get_attribute("data-label"))
    finally:
        browser.set_window_size(1280, 1500)


def test_every_control_is_labelled_and_reachable_by_keyboard(console_server, browser) -> None:
    open_console(browser, console_server.url)
    unlabelled = js(
        browser,
        "return Array.from(document.querySelectorAll('input, select, textarea'))"
        ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)",
    )
    assert unlabelled == []
    assert js(
        browser, "return Array.from(document.querySelectorAll('button')).every(b => b.textContent.trim())"
    )
    reached = []
    body = browser.find_element(By.TAG_NAME, "body")
    body.click()
    for _ in range(40):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        reached.append(js(browser, "return document.activeElement.id"))
    wanted = {"model", "brush", "center", "clear", "upload", "eps", "steps", "restarts", "seed", "smallest"}
    wanted |= {"run-attack", "token", "use-token"}
    assert wanted <= set(reached), wanted - set(reached)


def test_the_model_list_follows_loads_and_unloads_without_a_reload(console_server, browser) -> None:
    """A model loaded through the repository API appears in the selector and leaves it when
    unloaded, on a page that is not reloaded."""
    open_console(browser, console_server.url)

    def options(d: webdriver.Chrome) -> list[str]:
        return js(d, "return [...document.getElementById('model').options].map((o) => o.value)")

    assert options(browser) == ["tiny"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with console_server.client() as c:
        r = c.post("/v2/repository/models/big/load", headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        wait(browser, lambda d: options(d) == ["tiny", "big"], timeout=30)
        assert js(browser, "return document.getElementById('model').value") == "tiny"
        r = c.post("/v2/repository/models/big/unload", headers=auth)
        assert r.status_code == 200, r.text
        wait(browser, lambda d: options(d) == ["tiny"], timeout=30)
    assert page_errors(browser) == []
