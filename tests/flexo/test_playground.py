"""The playground (`GET /` of `flexo serve`) in a real headless Chromium: it lists the owners, generates
with per-token attribution, opts an owner out, and shows the server's error when every owner is off.
What the page shows is checked against a direct POST of the same request."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the venv has it
    pytest.skip("selenium is not installed", allow_module_level=True)
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(f"needs Debian's chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER})", allow_module_level=True)

PROMPT = "The function returns"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def url(merged):
    from flexo.openai_server import create_app, load_engine, serving_in_thread

    engine = load_engine(merged)
    try:
        with serving_in_thread(create_app(engine)) as base:
            yield base
    finally:
        engine.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    d = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    yield d
    d.quit()


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def text_of(driver, css: str) -> str:
    """The DOM text exactly (Selenium's `.text` collapses whitespace)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.textContent).join('')", css)


def generate(driver) -> str:
    driver.find_element(By.ID, "generate").click()  # the status turns "running…" inside the click
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text in ("done", "error"))
    return driver.find_element(By.ID, "status").text


def shares(driver) -> dict[str, float]:
    return {bar.get_attribute("data-expert"): float(bar.get_attribute("data-share"))
            for bar in driver.find_elements(By.CSS_SELECTOR, "#shares [data-expert]")}


def request(model: str, exclude: list[str]) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "exclude": exclude,
            "attribution": "tokens"}


def check_answer(driver, url: str, model: str, exclude: list[str]) -> list[str]:
    """The page's continuation, owners and bars are the direct POST's; returns the tokens' owners."""
    status, direct = post(url, request(model, exclude))
    assert status == 200, direct
    choice = direct["choices"][0]
    spans = driver.find_elements(By.CSS_SELECTOR, "#output .tok")
    owners = [s.get_attribute("data-owner") for s in spans]
    assert len(spans) == len([t for t in choice["attribution"]["per_token"] if t["text"]]) >= 1
    assert owners == [t["owner"] for t in choice["attribution"]["per_token"] if t["text"]]
    assert all("background" in (s.get_attribute("style") or "") for s in spans)
    assert text_of(driver, "#output .tok") == choice["text"]
    assert text_of(driver, "#output") == PROMPT + choice["text"]  # the prompt first, unstyled
    assert driver.find_elements(By.CSS_SELECTOR, "#output .prompt .tok") == []
    bars = shares(driver)
    assert list(bars) == ["public", "alpha", "beta"]
    assert sum(bars.values()) == pytest.approx(1.0, abs=2e-3)
    for expert, share in choice["attribution"]["prob_share"].items():
        assert bars[expert] == pytest.approx(share, abs=1e-4)
    for bar in driver.find_elements(By.CSS_SELECTOR, "#shares [data-expert]"):  # the percentage as text
        name = bar.get_attribute("data-expert")
        label = bar.find_element(By.XPATH, "./ancestor::div[contains(@class, 'bar-row')]").text.split("\n")
        assert label[0] == name
        if name in exclude:
            assert label[-1] == "excluded (0)"
        else:
            assert label[-1].endswith("%")
            assert float(label[-1][:-1]) == pytest.approx(100 * choice["attribution"]["prob_share"][name], abs=0.051)
    return owners


def test_playground_generates_opts_out_and_shows_errors(driver, url, merged):
    driver.get(url + "/")
    assert driver.title == "flexo playground"
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "status").text == "ready")
    assert driver.find_element(By.ID, "model").text == merged.name
    boxes = driver.find_elements(By.CSS_SELECTOR, "#owners input[type=checkbox]")
    assert [(b.get_attribute("id"), b.get_attribute("data-owner"), b.is_selected()) for b in boxes] == [
        ("owner-alpha", "alpha", True), ("owner-beta", "beta", True)]
    assert [e.get_attribute("data-expert") for e in driver.find_elements(By.CSS_SELECTOR, "#legend [data-expert]")] \
        == ["public", "alpha", "beta"]
    assert driver.find_element(By.ID, "max-tokens").get_attribute("value") == "24"
    assert driver.find_element(By.ID, "temperature").get_attribute("value") == "0"

    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    tokens = driver.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))

    # every owner included
    assert generate(driver) == "done"
    assert driver.find_element(By.ID, "error").text == ""
    owners = check_answer(driver, url, merged.name, [])
    assert set(owners) <= {"public", "alpha", "beta"}

    # beta opted out for this request: its bar is 0, no token is its own
    driver.find_element(By.ID, "owner-beta").click()
    assert generate(driver) == "done"
    owners = check_answer(driver, url, merged.name, ["beta"])
    assert "beta" not in owners
    assert shares(driver)["beta"] == 0.0

    # every owner off: the server refuses (400) and the page shows its message
    driver.find_element(By.ID, "owner-alpha").click()
    assert generate(driver) == "error"
    status, body = post(url, request(merged.name, ["alpha", "beta"]))
    assert status == 400 and body["error"]["param"] == "exclude"
    assert driver.find_element(By.ID, "error").text == body["error"]["message"]
    assert driver.find_elements(By.CSS_SELECTOR, "#output .tok") == []

    # owners back on: the page recovers
    driver.find_element(By.ID, "owner-alpha").click()
    driver.find_element(By.ID, "owner-beta").click()
    assert generate(driver) == "done"
    assert driver.find_element(By.ID, "error").text == ""
    check_answer(driver, url, merged.name, [])
