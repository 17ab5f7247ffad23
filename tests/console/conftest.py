"""A real `rulebound serve` on a demo store, and a real headless Chromium driven by Playwright.

The server is started as a subprocess (`--port 0`; it prints its address) with a bearer token
and a canary secret configured in one of its executors (tests/console/app.py); the browser is
Debian's chromium (no browser download). Every page a test opens fails the test on any console
error or uncaught page error. Screenshots go to tests/console/artifacts/ (git-ignored).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).with_name("artifacts")
CHROMIUM = os.environ.get("RULEBOUND_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
RULEBOUND = str(Path(sys.executable).with_name("rulebound"))


@dataclass
class Server:
    url: str
    token: str
    canary: str
    store: str
    process: subprocess.Popen[str]

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
            **(headers or {})})
        with urllib.request.urlopen(request, timeout=10) as answer:
            raw = answer.read()
        return json.loads(raw) if answer.headers.get_content_type() == "application/json" \
            else raw.decode()

    def wait_for(self, run_id: str, check: Any, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.call("GET", f"/v1/runs/{run_id}")
            if check(run):
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} never got there: {run['status']}, "
                                     f"waiting for {run['waiting_for']}")
            time.sleep(0.05)

    def start_refund(self, order: str, amount: float = 250.0) -> str:
        started = self.call("POST", "/v1/runs", {"workflow": "refund",
                                                 "input": {"order": order, "amount": amount}})
        run_id = started["run_id"]
        self.wait_for(run_id, lambda r: "approval" in r["waiting_for"])
        return run_id


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`rulebound demo` fills a store; `rulebound serve` serves it with a token."""
    where = tmp_path_factory.mktemp("console")
    store = f"sqlite:///{where / 'demo.db'}"
    subprocess.run([RULEBOUND, "demo", "--store", store, "--no-explain"], check=True,
                   capture_output=True, cwd=where, timeout=120)
    token, canary = secrets.token_urlsafe(24), "canary-" + secrets.token_hex(12)
    env = {**os.environ, "RULEBOUND_TOKEN": token, "CONSOLE_CANARY": canary,
           "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [RULEBOUND, "serve", "--store", store, "--port", "0",
         "--app", str(ROOT / "tests" / "console" / "app.py") + ":registry"],
        stderr=subprocess.PIPE, text=True, cwd=where, env=env)
    assert process.stderr is not None
    line = process.stderr.readline()
    if " on http://" not in line:
        process.kill()
        raise AssertionError(f"serve did not start: {line}{process.stderr.read()}")
    url = line.split(" on ", 1)[1].split()[0]
    try:
        yield Server(url, token, canary, store, process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")  # not longer: while Playwright's sync API is open it keeps
def browser() -> Iterator[Any]:     # an event loop set, and every async test after it fails
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        pytest.fail(f"no chromium at {CHROMIUM}: `make test` installs Debian's chromium "
                    "(apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Console:
    """One browser tab on the console, signed in, recording every error and /v1 answer."""

    page: Any
    server: Server
    viewport: str
    errors: list[str] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)

    def open(self, route: str, ready: str) -> Any:
        self.page.goto(f"{self.server.url}/#{route}")
        self.page.wait_for_selector(f'main[data-ready="{ready}"]', timeout=10_000)
        return self.page

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}-{self.viewport}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def _console(browser: Any, server: Server, viewport: str) -> Iterator[Console]:
    context = browser.new_context(viewport=VIEWPORTS[viewport], accept_downloads=True)
    page = context.new_page()
    tab = Console(page, server, viewport)
    page.on("console", lambda m: tab.errors.append(f"console.{m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: tab.errors.append(f"page error: {exc}"))

    def keep(response: Any) -> None:
        if "/v1/" in response.url and "follow=1" not in response.url:
            # a body the page no longer holds (it navigated away) is simply not kept
            with contextlib.suppress(Exception):
                tab.bodies.append(response.text())

    page.on("response", keep)
    # sign in once: the page asks for the token, keeps it in sessionStorage
    page.goto(server.url + "/")
    page.wait_for_selector("#token-form", timeout=10_000)
    assert server.token not in page.url
    page.fill("#token-input", server.token)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector('main[data-ready="runs"]', timeout=10_000)
    try:
        yield tab
    finally:
        context.close()
    assert not tab.errors, "the browser reported errors:\n" + "\n".join(tab.errors)


@pytest.fixture(params=list(VIEWPORTS))
def console(request: pytest.FixtureRequest, browser: Any, server: Server) -> Iterator[Console]:
    """A signed-in tab at each viewport size."""
    yield from _console(browser, server, request.param)


@pytest.fixture
def desktop(browser: Any, server: Server) -> Iterator[Console]:
    yield from _console(browser, server, "desktop")
