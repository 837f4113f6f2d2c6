"""Regenerate docs/inspect-report.png, the README's screenshot of `plainllama inspect --html`.

.venv/bin/python scripts/report_screenshot.py   (needs chromium and chromedriver)
"""

import os
import subprocess
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

with tempfile.TemporaryDirectory() as tmp:
    report = os.path.join(tmp, "report.html")
    subprocess.run(
        [sys.executable, "-m", "plainllama", "inspect", "The capital of France is", "-n", "4", "--html", report],
        check=True,
        capture_output=True,
    )
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--hide-scrollbars",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.get("file://" + report)
    driver.set_window_size(1200, driver.execute_script("return document.body.scrollHeight") + 40)
    driver.save_screenshot(os.path.join(ROOT, "docs", "inspect-report.png"))
    driver.quit()
