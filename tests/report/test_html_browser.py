"""The HTML report in a real browser: headless Chromium driven by Selenium.

Chromium and its driver are Debian's (`chromium`, `chromium-driver`); the
session fixture installs them with apt-get when they are missing. Outside CI
a machine that cannot (no root, no apt) skips with the reason; in CI
(CI set) that is a failure, never a silent skip.

The comparison report's screenshot is also the README's: docs/report.png,
written when missing or when PTILAB_UPDATE_DOCS is set.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from ptilab.audit.image import audit_image
from ptilab.report.html import audit_report, comparison_report

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
README_SHOT = Path(__file__).resolve().parents[2] / "docs" / "report.png"
WINDOW = (1280, 900)
README_HEIGHT = 1700


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _browser_paths() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    return (chromium, driver) if chromium and driver else None


def _install_chromium() -> str | None:
    """apt-get install Debian's chromium and chromium-driver; an error message or None."""
    if not shutil.which("apt-get"):
        return "no apt-get to install chromium with"
    if os.geteuid() != 0:
        return "chromium is not installed and installing it needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd)} timed out"
        if done.returncode:
            return f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """One headless Chromium for the session, with a fresh profile and console logging."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")
    paths = _browser_paths()
    if paths is None:
        error = _install_chromium()
        paths = _browser_paths()
        if paths is None:
            _unavailable(error or "chromium or chromedriver missing after apt-get install")
    chromium, driver_path = paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Both paths given: Selenium Manager has nothing to look up or download.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_window_size(*WINDOW)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def comparison_page(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "comparison.html"
    path.write_text(comparison_report("linux-6.1", cpus=4, levels=4))
    return path


def png_pixels(png: bytes) -> np.ndarray:
    """Decode an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes) to (h, w, channels)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and not interlace, (depth, colour, interlace)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), dtype=np.uint8)
    prev = np.zeros(width * bpp, dtype=np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            row = line
        elif kind == 1:  # Sub: a running sum along the row, per channel
            row = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) & 0xFF
        elif kind == 2:  # Up
            row = (line + prev) & 0xFF
        else:  # Average or Paeth: each byte needs the decoded byte to its left
            row = line.copy()
            up = prev.tolist()
            cur = row.tolist()
            for i in range(len(cur)):
                left = cur[i - bpp] if i >= bpp else 0
                if kind == 3:
                    cur[i] = (cur[i] + ((left + up[i]) >> 1)) & 0xFF
                else:
                    ul = up[i - bpp] if i >= bpp else 0
                    p = left + up[i] - ul
                    pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - ul)
                    pred = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else ul)
                    cur[i] = (cur[i] + pred) & 0xFF
            row = np.array(cur, dtype=np.int32)
        out[y] = row
        prev = row
    return out.reshape(height, width, bpp)


def distinct_colours(pixels: np.ndarray) -> int:
    rgb = pixels[..., :3].astype(np.uint32)
    return len(np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]))


def console_errors(driver) -> list[str]:
    return [f"{entry['level']}: {entry['message']}" for entry in driver.get_log("browser")
            if entry["level"] in ("SEVERE", "ERROR")]


def test_png_decoder_reads_every_filter():
    # One row per PNG filter type (0-4), encoded by hand.
    width, rows = 3, np.array([[[10, 20, 30]] * 3, [[40, 50, 60]] * 3, [[70, 80, 90]] * 3,
                               [[15, 25, 35]] * 3, [[200, 100, 50]] * 3], dtype=np.int32)
    rows[:, 1] += 7
    raw, prev = b"", np.zeros(width * 3, np.int32)
    for kind, row in enumerate(rows.reshape(5, -1)):
        left = np.concatenate((np.zeros(3, np.int32), row[:-3]))
        ul = np.concatenate((np.zeros(3, np.int32), prev[:-3]))
        if kind == 0:
            pred = np.zeros_like(row)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prev
        elif kind == 3:
            pred = (left + prev) >> 1
        else:
            p = left + prev - ul
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - ul)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, ul))
        raw += bytes([kind]) + bytes(((row - pred) & 0xFF).astype(np.uint8))
        prev = row
    ihdr = struct.pack(">IIBBBBB", width, 5, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    assert (png_pixels(png) == rows).all()


def test_comparison_renders_tree_with_shared_tables_and_saves_the_readme_shot(browser, comparison_page):
    from selenium.webdriver.common.by import By

    browser.get(comparison_page.as_uri())
    assert browser.title == "PTI designs on linux-6.1"
    rows = browser.find_elements(By.CSS_SELECTOR, "#compare-table tbody tr.design-row")
    assert [r.get_attribute("data-design") for r in rows] == ["explicit", "mirror", "shared-pmd", "linux"]
    for design in ("explicit", "mirror", "shared-pmd", "linux"):
        tree = browser.find_element(By.ID, f"d-{design}-tree")
        assert tree.tag_name == "svg" and tree.is_displayed()
        for view in ("user", "kernel"):
            pgd = browser.find_element(By.ID, f"d-{design}-tree-pgd-{view}")
            assert pgd.is_displayed() and "PGD" in pgd.text
    shared = browser.find_elements(By.CSS_SELECTOR, "#d-linux-tree g.tree-box.shared rect")
    assert shared and shared[0].value_of_css_property("stroke-width") == "3px"
    # The highlight is a colour the browser really paints, not just a class name.
    assert shared[0].value_of_css_property("fill") == "rgb(201, 239, 211)"
    assert browser.find_elements(By.CSS_SELECTOR, "#d-linux-map g.map-seg")
    plot = browser.find_element(By.ID, "cost-plot")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", plot) > 600
    assert console_errors(browser) == []

    browser.execute_script("window.scrollTo(0, 0)")
    png = browser.get_screenshot_as_png()
    pixels = png_pixels(png)
    assert pixels.shape[0] >= WINDOW[1] // 2 and pixels.shape[1] >= WINDOW[0] // 2
    assert distinct_colours(pixels) > 50, "the screenshot is (nearly) blank"
    assert (pixels[..., :3] < 128).any(axis=-1).mean() > 0.01, "no dark text drawn"

    # The README's picture: the linux design's map and tree, in a taller window.
    browser.set_window_size(WINDOW[0], README_HEIGHT)
    try:
        section = browser.find_element(By.ID, "design-linux")
        browser.execute_script("arguments[0].scrollIntoView()", section)
        shot = section.screenshot_as_png
    finally:
        browser.set_window_size(*WINDOW)
    assert distinct_colours(png_pixels(shot)) > 50
    assert len(shot) < 300_000, f"docs/report.png would be {len(shot)} bytes"
    # Refreshed on request only, so a test run leaves the work tree clean.
    if os.environ.get("PTILAB_UPDATE_DOCS") or not README_SHOT.exists():
        README_SHOT.parent.mkdir(exist_ok=True)
        README_SHOT.write_bytes(shot)


def test_audit_report_shows_findings_and_the_real_kernels_shared_tables(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from tests.realkernel.conftest import real_kernel

    k = real_kernel("pti-4level")
    path = tmp_path / "audit.html"
    path.write_text(audit_report(audit_image(k.mem, "pti-4level", k.cpu()["cr3"], k.geometry, k.symbols), k.mem))
    browser.get(path.as_uri())
    findings = browser.find_elements(By.CSS_SELECTOR, "#findings-table tbody tr.finding")
    assert "PTI-USER-VIEW" in [f.get_attribute("data-id") for f in findings]
    assert browser.find_element(By.ID, "image-tree-pgd-user").is_displayed()
    assert browser.find_element(By.ID, "image-tree-pgd-kernel").is_displayed()
    shared = browser.find_elements(By.CSS_SELECTOR, "#image-tree g.tree-box.shared")
    assert any("cpu_entry_area" in g.get_attribute("data-reaches") for g in shared)
    assert console_errors(browser) == []
    pixels = png_pixels(browser.get_screenshot_as_png())
    assert distinct_colours(pixels) > 50
