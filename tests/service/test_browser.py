"""The dashboard in a real browser: headless Chromium from Debian's ``chromium`` package, driven by Playwright with
``/usr/bin/chromium`` (no browser download). Logs in with a token, finds the front plot and the candidate table of
a finished search, sorts the table, follows a recipe download, watches a running search update live, and saves
screenshots (to ``docs/img/`` when they are missing there or ``EVOMERGE_UPDATE_SCREENSHOTS=1``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from service_helpers import TOKEN, LiveServer, digits_spec, wait_for

CHROMIUM = Path(os.environ.get("EVOMERGE_CHROMIUM", "/usr/bin/chromium"))
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI must run the browser test")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield instance
        instance.close()


def _keep(shot: Path, name: str) -> None:
    target = DOCS_IMG / name
    if os.environ.get("EVOMERGE_UPDATE_SCREENSHOTS") == "1" or not target.exists():
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


def test_the_search_page_shows_the_front_and_candidates_downloads_recipes_and_updates_live(
        browser, tmp_path: Path, model_root: Path) -> None:
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with LiveServer(tmp_path / "srv", db=db, roots=[model_root]) as server, server.client() as api:
        finished = api.post("/api/v1/searches", json=digits_spec(name="digits-ties", budget=64,
                                                                  options={"pop_size": 16})).json()["id"]
        document = wait_for(api, finished, server=server)
        context = browser.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        page.goto(f"{server.url}/searches/{finished}")
        assert "/login" in page.url  # the token is asked once...
        page.fill("#token", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(f"**/searches/{finished}")
        cookies = {c["name"]: c for c in context.cookies()}
        assert cookies["evomerge_token"]["httpOnly"] and cookies["evomerge_token"]["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # ...and page scripts cannot read it

        page.wait_for_selector("#front-plot .main-svg", timeout=30_000)
        page.wait_for_selector("#progress-plot .main-svg", timeout=30_000)
        legend = page.text_content("#front-plot .legend") or ""
        assert "front" in legend and "experts alone" in legend and f"best (#{document['best']['id']})" in legend
        page.wait_for_function("document.querySelectorAll('#candidates tbody tr').length === 25")
        assert page.inner_text("#status") == "done"
        assert "64 of 64 evaluated" in page.inner_text("#progress")
        assert page.locator("#candidates tbody tr.best").count() <= 1

        # sort by the first objective (best first) by its column header
        page.click("#candidates th[data-sort=acc_0_4]")
        page.wait_for_function("document.querySelector('#candidates th[data-sort=acc_0_4]').classList"
                               ".contains('active')")
        page.wait_for_timeout(300)
        column = page.eval_on_selector_all("#candidates tbody tr td:nth-child(3)",
                                           "cells => cells.map(c => parseFloat(c.textContent))")
        assert column == sorted(column, reverse=True) and len(column) == 25

        with page.expect_download() as download:
            page.click("#best-yaml")
        path = download.value.path()
        recipe = yaml.safe_load(Path(path).read_text())
        assert recipe["merge_method"] == "ties" and download.value.suggested_filename.endswith(".yml")
        with page.expect_download() as row_download:
            page.click("#candidates tbody tr:first-child a:text('JSON')")
        assert row_download.value.suggested_filename.endswith(".json")

        shot = tmp_path / "search.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 50_000
        _keep(shot, "dashboard-search.png")

        # a running search updates without a reload (server-sent events)
        running = api.post("/api/v1/searches", json=digits_spec(name="live", algorithm="cmaes", budget=36,
                                                                 pause={"seconds": 0.1})).json()["id"]
        page.goto(f"{server.url}/searches/{running}")
        page.wait_for_function("parseInt(document.querySelector('#progress').textContent) >= 6", timeout=60_000)
        first = int(page.inner_text("#progress").split()[0])
        page.wait_for_function(f"parseInt(document.querySelector('#progress').textContent) > {first}",
                               timeout=60_000)
        page.wait_for_function("document.querySelector('#status').textContent === 'done'", timeout=120_000)

        page.goto(server.url + "/")
        page.wait_for_selector(f"#searches a[href='/searches/{running}']")
        listing = tmp_path / "list.png"
        page.screenshot(path=str(listing))
        _keep(listing, "dashboard-list.png")
        assert not errors, errors
        context.close()
