"""The docs site as a reader sees it: every page in headless Chromium at 1280 px.

The site is built, served on 127.0.0.1 and opened in Chromium (Debian's package),
driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: the protocol
is NUL-separated JSON on fds 3 and 4, so no websocket client is needed). Each page is
screenshotted and measured in the page itself:

- no code block or table is wider than its box (a reader would have to scroll
  sideways, and the end of a comment is cut off);
- no table of contents lists one heading twice, and no passage of a page is shown
  twice (the examples page once printed each docstring above the source that holds it);
- every page the build produced is reachable from the navigation.

Screenshots go to ``$AIOSYNC_SCREENSHOTS`` if set, else to the test's temporary
directory; look at them when a check fails. Without Chromium the tests skip, saying
how to install it (``.ci/run`` installs it, so CI always runs them). The browser only
reaches 127.0.0.1: the theme's web fonts fall back to local ones, which have the same
monospace advance width.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import selectors
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_docs import build

ROOT = Path(__file__).parent.parent
WIDTH = 1280
HEIGHT = 900
SHOT_MAX_HEIGHT = 6000  # a long page is shot down to here, enough to see its layout
PATIENCE = 30.0  # seconds for one browser answer on a loaded 2-core machine
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
    f"--window-size={WIDTH},{HEIGHT}",
    # Only the local server: the theme's web fonts must not be fetched (no network in
    # CI, and a slow font server would make a page's load time the network's).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Chromium is not installed: `apt-get install chromium` (Debian's package; "
        ".ci/run installs it) to check the docs site as screenshots",
    ),
    pytest.mark.timeout(150),
]

# Runs in each page; returns what a reader would notice, as JSON-able data.
MEASURE = r"""
(() => {
  const text = (el) => el.textContent.replace(/\s+/g, " ").trim();
  const overflowing = [];
  const boxes = document.querySelectorAll(
    ".md-content pre > code, .md-content .md-typeset__scrollwrap");
  for (const box of boxes) {
    if (box.scrollWidth > box.clientWidth + 1) {
      const line = box.textContent.split("\n").reduce(
        (a, b) => (b.length > a.length ? b : a), "");
      overflowing.push({what: box.tagName === "CODE" ? "code block" : "table",
                        scrollWidth: box.scrollWidth, clientWidth: box.clientWidth,
                        widest: line.trim().slice(0, 120)});
    }
  }
  // Table of contents: a heading listed twice under the same parent.
  const tocTwice = [];
  for (const list of document.querySelectorAll("nav.md-nav--secondary ul")) {
    const seen = new Set();
    for (const item of list.children) {
      const link = item.querySelector(":scope > a");
      if (!link) continue;
      const label = text(link);
      if (seen.has(label)) tocTwice.push(label);
      seen.add(label);
    }
  }
  // A passage shown twice: three consecutive non-blank lines of one block (prose or
  // a code block) that appear again in another block of the page. Two Python blocks
  // may share lines (examples start with the same imports); prose may not repeat.
  const where = new Map();
  const shownTwice = new Set();
  const blocks = document.querySelectorAll(".md-content pre, .md-content p");
  blocks.forEach((block, n) => {
    const python = block.closest(".language-python") !== null;
    const lines = block.textContent.split("\n").map((s) => s.trim()).filter((s) => s);
    for (let i = 0; i + 3 <= lines.length; i++) {
      const passage = lines.slice(i, i + 3).join("\n");
      if (passage.length < 60) continue;
      const first = where.get(passage);
      if (first === undefined) where.set(passage, {n, python});
      else if (first.n !== n && !(first.python && python)) {
        shownTwice.add(passage.slice(0, 120));
      }
    }
  });
  const nav = [...document.querySelectorAll("nav.md-nav--primary a.md-nav__link[href]")]
    .map((a) => a.href.split("#")[0]);
  return {overflowing, tocTwice, shownTwice: [...shownTwice], nav,
          height: document.documentElement.scrollHeight};
})()
"""


class DevTools:
    """A minimal DevTools protocol client over Chromium's --remote-debugging-pipe."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Chromium reads commands on fd 3 and writes answers on fd 4; a tiny exec
        # wrapper puts the pipe ends there (preexec_fn is unsafe with threads).
        wrapper = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        command = [chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"]
        self.process = subprocess.Popen(
            [sys.executable, "-c", wrapper, str(to_browser_r), str(from_browser_w), *command],
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._from_browser, selectors.EVENT_READ)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self.session = ""

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=PATIENCE)
        self._selector.close()
        os.close(self._to_browser)
        os.close(self._from_browser)

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.select(left):
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (status {self.process.poll()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        result: dict[str, Any] = json.loads(message)
        return result

    def call(self, method: str, session: bool = True, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + PATIENCE
        while True:
            answer = self._receive(deadline)
            if answer.get("id") != self._next_id:
                self._events.append(answer)
            elif "error" in answer:
                raise RuntimeError(f"{method}: {answer['error']}")
            else:
                result: dict[str, Any] = answer["result"]
                return result

    def wait_for(self, event: str) -> None:
        deadline = time.monotonic() + PATIENCE
        while True:
            for n, seen in enumerate(self._events):
                if seen.get("method") == event:
                    del self._events[: n + 1]
                    return
            self._events.append(self._receive(deadline))

    def open_tab(self) -> None:
        target = self.call("Target.createTarget", session=False, url="about:blank")
        attached = self.call(
            "Target.attachToTarget", session=False, targetId=target["targetId"], flatten=True
        )
        self.session = attached["sessionId"]
        self.call("Page.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    def load(self, url: str) -> None:
        self._events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        self.evaluate("document.fonts.ready.then(() => true)")

    def evaluate(self, expression: str) -> Any:
        answer = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            raise RuntimeError(f"page script failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def screenshot(self, path: Path, height: int) -> None:
        clip = {"x": 0, "y": 0, "width": WIDTH, "height": min(height, SHOT_MAX_HEIGHT)}
        shot = self.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={**clip, "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("screenshots-site") / "site"
    result = build(ROOT, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def base_url(site: Path) -> Iterator[str]:
    handler = functools.partial(QuietHandler, directory=str(site))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}/"
        server.shutdown()
        thread.join(timeout=PATIENCE)


def pages(site: Path) -> list[str]:
    """Every page the build produced, as a path relative to the site's root."""
    found = []
    for html in sorted(site.rglob("index.html")):
        relative = html.parent.relative_to(site).as_posix()
        found.append("" if relative == "." else relative + "/")
    return found


@pytest.fixture(scope="module")
def measured(
    site: Path, base_url: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """Each page's measurements, taken once; a screenshot of each on the way."""
    assert CHROMIUM is not None
    shots = Path(os.environ.get("AIOSYNC_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    shots.mkdir(parents=True, exist_ok=True)
    browser = DevTools(CHROMIUM, tmp_path_factory.mktemp("chromium-profile"))
    try:
        browser.open_tab()
        results = {}
        for page in pages(site):
            browser.load(base_url + page)
            result = browser.evaluate(MEASURE)
            name = page.strip("/").replace("/", "-") or "index"
            browser.screenshot(shots / f"{name}.png", result["height"])
            results[page] = result
    finally:
        browser.close()
    print(f"screenshots of {len(results)} pages at {WIDTH} px in {shots}")
    return results


def test_the_site_has_pages(measured: dict[str, dict[str, Any]]) -> None:
    # The checks below are only as good as the pages they saw.
    assert {"", "api/", "examples/", "getting-started/"} <= measured.keys()
    assert all(result["height"] > HEIGHT / 2 for result in measured.values())


def test_no_code_block_or_table_is_cut_off(measured: dict[str, dict[str, Any]]) -> None:
    overflowing = {page: r["overflowing"] for page, r in measured.items() if r["overflowing"]}
    assert overflowing == {}, json.dumps(overflowing, indent=1)


def test_nothing_is_listed_or_shown_twice(measured: dict[str, dict[str, Any]]) -> None:
    twice = {
        page: {"table of contents": r["tocTwice"], "passages": r["shownTwice"]}
        for page, r in measured.items()
        if r["tocTwice"] or r["shownTwice"]
    }
    assert twice == {}, json.dumps(twice, indent=1)


def test_every_page_is_in_the_navigation(
    measured: dict[str, dict[str, Any]], base_url: str
) -> None:
    for page, result in measured.items():
        reachable = {url.removeprefix(base_url) for url in result["nav"]}
        assert reachable == measured.keys(), f"the navigation of page {page!r}"
