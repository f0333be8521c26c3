"""The live denoising page in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Opens ``/``, submits a prompt, waits for the canvas to finish, checks the rendered answer and NFE
against the API, runs the side-by-side mode, and saves a screenshot under pytest's ``tmp_path``; with
``FEWSTEP_UPDATE_SCREENSHOTS=1`` it is also copied to ``docs/img/serve-page.png`` (the one docs/serving.md shows).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import POLICY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS_SCREENSHOT = Path(__file__).parents[2] / "docs" / "img" / "serve-page.png"
PROMPT = "5 + 9 - 1 - 7 + 1 ?"


def test_page_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "install Debian's chromium package (apt-get install -y chromium)"
    shot = tmp_path / "serve-page.png"
    api = {}
    for policy in (POLICY, "llada:steps=64"):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "policy": policy}, timeout=60).json()
        api[policy] = (r["choices"][0]["text"], r["usage"]["nfe"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760}, device_scale_factor=1)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'dparallel'")
            assert page.input_value("#policy") == POLICY and page.input_value("#max_tokens") == "64"
            page.fill("#prompt", PROMPT)
            page.click("#go")
            pane = page.locator(".pane").first
            page.wait_for_function("document.querySelector('.pane') && document.querySelector('.pane').dataset.done")
            assert pane.get_attribute("data-done") == "1", pane.inner_text()
            text, nfe = api[POLICY]
            assert pane.locator(".answer").inner_text() == text
            assert pane.locator(".nfe").inner_text() == str(nfe) and pane.get_attribute("data-nfe") == str(nfe)
            assert pane.locator(".tok.mask").count() == 0 and pane.locator(".tok").count() == 64

            # side by side: the student's policy against one token per step, on the same prompt
            page.check("#compare")
            page.fill("#policy2", "llada:steps=64")
            page.click("#go")
            page.wait_for_function(
                "[...document.querySelectorAll('.pane')].length === 2 && "
                "[...document.querySelectorAll('.pane')].every(p => p.dataset.done)"
            )
            panes = page.locator(".pane")
            for i, policy in enumerate((POLICY, "llada:steps=64")):
                assert panes.nth(i).get_attribute("data-done") == "1"
                assert panes.nth(i).locator(".answer").inner_text() == api[policy][0]
                assert panes.nth(i).locator(".nfe").inner_text() == str(api[policy][1])
            # distinct step colours: the student commits many tokens per step, the baseline one
            colours = [
                len(
                    set(
                        panes.nth(i)
                        .locator(".tok")
                        .evaluate_all(
                            "els => els.filter(e => !e.classList.contains('eos')).map(e => e.style.background)"
                        )
                    )
                )
                for i in range(2)
            ]
            assert colours[0] < colours[1]
            assert not errors, errors
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("FEWSTEP_UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_page_marks_revisions(server, tmp_path):
    """A revising policy (DMax's ``spd``) on the page: the revisions counter is the stream's, every position a
    revision changed stays marked, and the tokens revised at the last forward are outlined."""
    import json

    from playwright.sync_api import sync_playwright

    policy, body = "spd:0.5", {"prompt": PROMPT, "policy": "spd:0.5", "stream": True, "stream_mode": "denoise"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    steps = [e for e in events if e["object"] == "fewstep.denoise.step"]
    revisions = sum(len(e["revised"]) for e in steps)
    changed = set().union(*(e["revised"] for e in steps))
    assert revisions > 0
    shot = tmp_path / "serve-page-spd.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 760}, device_scale_factor=1)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'dparallel'")
            page.fill("#prompt", PROMPT)
            page.fill("#policy", policy)
            page.click("#go")
            page.wait_for_function("document.querySelector('.pane') && document.querySelector('.pane').dataset.done")
            pane = page.locator(".pane").first
            assert pane.get_attribute("data-done") == "1", pane.inner_text()
            assert pane.locator(".revs").inner_text() == str(revisions) == pane.get_attribute("data-revisions")
            assert pane.locator(".tok.was-revised").count() == len(changed)
            assert pane.locator(".tok.revised").count() == len(steps[-1]["revised"])
            assert pane.locator(".answer").inner_text() == next(
                e["text"] for e in events if e["object"] == "fewstep.denoise.done"
            )
            assert not errors, errors
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
