"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): every page renders
against a history of real backups and drills, its plots draw, an alert is acknowledged from the
page, a backup started from the page shows live progress on the running page."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from keepwell.control.history import History
from tests.integration.control_support import Workspace
from tests.integration.test_web_api import _web
from tests.integration.web_support import Client, files_workspace

CHROMIUM = "/usr/bin/chromium"

# true when at least one pixel of the plot's canvas is painted
CANVAS_PAINTED = """el => {
  const c = el.querySelector('canvas');
  if (!c || !c.width || !c.height) return false;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  for (let i = 3; i < d.length; i += 4) if (d[i] !== 0) return true;
  return false;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert os.path.exists(CHROMIUM), "Chromium is missing: run .ci/install.d/browser.sh"
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    w = Workspace(tmp_path)
    yield w
    w.close()


def _plots_painted(page: Page) -> list[bool]:
    plots = page.locator(".plot[data-plot]")
    return [bool(plots.nth(i).evaluate(CANVAS_PAINTED)) for i in range(plots.count())]


def test_pages_render_their_plots_and_an_alert_is_acknowledged(ws: Workspace,
                                                               browser: Browser) -> None:
    files_workspace(ws)
    for i in range(3):
        (ws.root / "data" / "docs" / f"more{i}.bin").write_bytes(os.urandom(16 * 1024 * (i + 1)))
        ws.cli("run", "docs", check=True)
    ws.cli("drill", "docs-drill", check=True)
    ws.cli("drill", "docs-drill", check=True)
    history = History(str(ws.history))
    history.raise_alert("photos:stale", "photos", "stale", "no successful backup of photos")
    history.close()
    proc = _web(ws)
    base = proc.address()
    page = browser.new_page()
    errors: list[Any] = []
    page.on("pageerror", lambda exc: errors.append(exc))

    page.goto(base + "/")
    rows = page.locator("#sources tr.src")
    assert [rows.nth(i).get_attribute("data-source") for i in range(rows.count())] == [
        "photos", "docs"]  # the source with an open alert first
    assert "state-red" in (rows.nth(0).get_attribute("class") or "")
    assert page.locator("#alerts tr.alert").count() == 1

    page.click("#alerts tr.alert button.act")
    page.wait_for_selector("#alerts tr.alert", state="detached")
    client = Client(base)
    (alert,) = client.get("/api/v1/alerts")
    assert alert["open"] is False and alert["acknowledged_by"].startswith("web:operator:loopback")
    page.reload()
    assert page.locator("#alerts button.act").count() == 0

    page.goto(base + "/sources/docs")
    page.wait_for_selector(".plot[data-drawn='1']")
    assert _plots_painted(page) == [True, True, True]
    assert page.locator("table.snapshots tr").count() == 1 + 3
    page.click("table.runs a >> nth=0")
    assert page.locator("table.log tr").count() >= 2
    assert "succeeded" in page.locator("table.log").inner_text()

    page.goto(base + "/repositories/main")
    page.wait_for_selector(".plot[data-drawn='1']")
    assert _plots_painted(page) == [True, True]
    assert page.locator("#dedup").inner_text().endswith("×")

    page.goto(base + "/drills")
    page.wait_for_selector(".plot[data-drawn='1']")
    assert _plots_painted(page) == [True]
    assert not errors, errors
    page.close()
    assert proc.stop() == 0


def test_a_backup_started_from_the_page_shows_live_progress(ws: Workspace,
                                                            browser: Browser) -> None:
    # an upload limit makes the backup last long enough to be watched while it runs
    files_workspace(ws)
    (ws.root / "data" / "photos" / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    doc = ws.config_path.read_text().replace(
        "paths:\n    - data/photos", "paths:\n    - data/photos\n    upload_limit: 1MiB")
    ws.config_path.write_text(doc)
    proc = _web(ws)
    base = proc.address()
    page = browser.new_page()
    page.goto(base + "/")
    page.click("tr[data-source='photos'] button.act")
    page.wait_for_selector("tr[data-source='photos'] .note.ok")

    live = browser.new_page()
    live.goto(base + "/running")
    row = live.wait_for_selector("#running tr[data-job^='backup:photos']", timeout=30000)
    assert row is not None
    live.wait_for_function(
        "() => [...document.querySelectorAll('#running tr[data-job] td')]"
        ".some(td => /MiB/.test(td.textContent))", timeout=30000)
    live.wait_for_selector("#running tr[data-job]", state="detached", timeout=60000)
    assert int(live.locator("#live-state").get_attribute("data-updates") or 0) >= 2
    (run,) = Client(base).get("/api/v1/runs?source=photos")
    assert run["status"] == "succeeded" and run["bytes_read"] >= 3 * 1024 * 1024
    page.close()
    live.close()
    assert proc.stop() == 0


def test_a_viewer_logs_in_and_sees_no_action_buttons(ws: Workspace, browser: Browser) -> None:
    (ws.root / "op.token").write_text("operator-token\n")
    (ws.root / "view.token").write_text("viewer-token\n")
    files_workspace(ws, web={"listen": "127.0.0.1:0", "token": f"file:{ws.root / 'op.token'}",
                             "viewer_token": f"file:{ws.root / 'view.token'}"})
    ws.cli("run", "docs", check=True)
    proc = _web(ws)
    base = proc.address()
    for token, buttons in (("viewer-token", 0), ("operator-token", 3)):
        page = browser.new_page()
        page.goto(base + "/")
        page.fill("input[name=token]", token)
        page.click("button[type=submit]")
        page.wait_for_selector("#sources tr.src")
        assert page.locator("button.act").count() == buttons  # two sources and one drill
        assert page.locator("#role").count() == (1 if buttons == 0 else 0)
        page.goto(base + "/sources/docs")
        page.wait_for_selector(".plot[data-drawn='1']")
        assert page.locator("button.act").count() == (0 if buttons == 0 else 1)
        page.close()
    assert proc.stop() == 0
