"""A screenshot of `flexo serve`'s playground for the docs: serves a model folder in-process, opens the
playground in headless Chromium (1280x900), runs one prompt and saves the page as a PNG.

    .venv/bin/python bench/playground_screenshot.py [--model models/merged-rt] [--out docs/playground.png]
        [--prompt "The president said"] [--max-tokens 32] [--exclude news ...]

Needs selenium (in the venv) and Debian's chromium + chromedriver (/usr/bin); Selenium Manager is never
asked to download a browser or a driver. Every owner is included unless --exclude names some.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def chromium(profile: Path, width: int = 1280, height: int = 900):
    """A headless Chromium driven by Debian's chromedriver, with a fresh profile at `profile`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--hide-scrollbars", f"--window-size={width},{height}",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    # --window-size counts the (invisible) browser frame: pin the page's own viewport instead
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/merged-rt", help="a merged model folder (default models/merged-rt)")
    ap.add_argument("--out", default="docs/playground.png", help="the PNG to write (default docs/playground.png)")
    ap.add_argument("--prompt", default="The president said")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--exclude", nargs="*", default=[], help="owners to uncheck before generating")
    args = ap.parse_args(argv)

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from flexo.openai_server import create_app, load_engine, serving_in_thread

    model, out = Path(args.model), Path(args.out)
    if not (model / "config.json").is_file():
        print(f"{model}: not a model folder (no config.json); build it first (make demo)", file=sys.stderr)
        return 2
    engine = load_engine(model)
    try:
        with serving_in_thread(create_app(engine)) as url, tempfile.TemporaryDirectory() as profile:
            driver = chromium(Path(profile))
            try:
                wait = WebDriverWait(driver, 120)
                driver.get(url + "/")
                wait.until(lambda d: d.find_element(By.ID, "status").text in ("ready", "error"))
                for name in args.exclude:
                    box = driver.find_element(By.ID, f"owner-{name}")
                    if box.is_selected():
                        box.click()
                prompt = driver.find_element(By.ID, "prompt")
                prompt.clear()
                prompt.send_keys(args.prompt)
                tokens = driver.find_element(By.ID, "max-tokens")
                tokens.clear()
                tokens.send_keys(str(args.max_tokens))
                start = time.time()
                driver.find_element(By.ID, "generate").click()
                wait.until(lambda d: d.find_element(By.ID, "status").text in ("done", "error"))
                error = driver.find_element(By.ID, "error").text
                if error:
                    print(f"the playground shows an error: {error}", file=sys.stderr)
                    return 1
                time.sleep(0.5)  # let the bars' width transition finish
                out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(out))
                n = len(driver.find_elements(By.CSS_SELECTOR, "#output .tok"))
                print(f"{out}: {n} tokens in {time.time() - start:.1f} s from {model}")
            finally:
                driver.quit()
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
