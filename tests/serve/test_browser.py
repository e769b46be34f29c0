"""End to end in Debian's chromium through Playwright: the run page, a feature, a neighbour, search, live
activations and a streamed steering request, checked on screen; screenshots in tests/artifacts/serve/."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serve.conftest import ARTIFACTS

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed")


@pytest.fixture(scope="module")
def server(tiny_run: Path) -> Iterator[str]:
    import uvicorn

    from monoscope.serve import create_app

    app = create_app(tiny_run, device="cpu", compute_dtype="fp32")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One Chromium for the module: Playwright's sync API refuses a second one while the first is open."""
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(server: str, browser) -> Iterator[object]:  # type: ignore[no-untyped-def]
    pg = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.errors = errors  # type: ignore[attr-defined]
    yield pg
    pg.close()


def _shot(pg, name: str) -> Path:  # type: ignore[no-untyped-def]
    out = ARTIFACTS / "serve"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    return path


def test_browse_search_and_steer(page, server: str) -> None:  # type: ignore[no-untyped-def]
    pg = page
    pg.goto(server + "/")
    assert pg.locator("h2", has_text="evaluation").is_visible()
    assert pg.get_by_text(re.compile(r"FVU \(")).first.is_visible()
    pg.wait_for_selector("canvas#featuremap[data-ready='256']")
    # hovering a point of the map shows its label; the canvas is drawn (not blank)
    box = pg.locator("canvas#featuremap").bounding_box()
    assert box is not None
    _shot(pg, "run")

    first = pg.locator("#interesting a.feat").first
    fid = first.inner_text().lstrip("#")
    first.click()
    pg.wait_for_url(re.compile(rf"/sae/sae/feature/{fid}$"))
    assert pg.locator("h1").inner_text().startswith(f"feature {fid}")
    assert pg.locator("#top .ctx").count() > 0
    peak = pg.locator("#top .tok.peak").first
    assert float(peak.get_attribute("title")) > 0  # value on hover

    # ablation effect on the second top context: one shaded token per window token, the loss change on hover
    pg.select_option("#ablateform select", index=min(1, pg.locator("#ablateform option").count() - 1))
    pg.click("#ablateform button")
    pg.wait_for_selector("#ablateform[data-done='1']", timeout=60_000)
    toks = pg.locator("#ablateout .tok")
    assert toks.count() > 3
    assert toks.nth(1).get_attribute("title").startswith("loss change ")
    assert any(toks.nth(i).get_attribute("data-delta") not in ("", "0") for i in range(toks.count()))
    _shot(pg, "feature")

    # the best match in the other width's SAE, linked
    match = pg.locator("#bestmatch a.match").first
    mtext = match.inner_text()  # "sae-2x #ID"
    match.click()
    pg.wait_for_url(re.compile(rf"/sae/sae-2x/feature/{mtext.split('#')[1]}$"))
    pg.go_back()

    nb = pg.locator("#neighbours a.feat").first
    nid = nb.inner_text().lstrip("#")
    nb.click()
    pg.wait_for_url(re.compile(rf"/sae/sae/feature/{nid}$"))
    assert pg.locator("h1").inner_text().startswith(f"feature {nid}")

    # try your own text: this feature's activations and the text's top features appear
    pg.fill("#tryform textarea", "the quick brown fox jumps over the lazy dog")
    pg.click("#tryform button")
    pg.wait_for_selector("#tryout table.tryhits tr")
    assert pg.locator("#tryout .tok").count() >= 9

    # search by label: a word of this feature's label finds it
    label = pg.locator("#label").inner_text()
    word = re.search(r"[A-Za-z]{3,}", label)
    pg.goto(server + "/sae/sae/search")
    pg.fill("input[name=q]", word.group(0) if word else "def")
    pg.click("form.panel >> nth=0 >> button")
    pg.wait_for_selector("#label-results")
    assert pg.locator("#label-results a.feat").count() > 0
    _shot(pg, "search")

    # steering: both continuations stream in
    pg.goto(server + f"/sae/sae/steer?feature={nid}")
    assert pg.locator("input[name=feature]").input_value() == nid
    pg.fill("input[name=max_new_tokens]", "12")
    pg.click("#steerform button[type=submit]")
    pg.wait_for_selector("#steerform[data-done='1']", timeout=60_000)
    assert pg.locator("#steerstatus").inner_text() == "done"
    assert pg.locator("#out-default").inner_text().strip() and pg.locator("#out-steered").inner_text().strip()
    _shot(pg, "steer")
    assert not pg.errors, pg.errors  # type: ignore[attr-defined]


def test_feature_page_screenshot_for_the_readme(page, server: str) -> None:  # type: ignore[no-untyped-def]
    """The README's picture of a feature page comes from here (docs/serve-feature.png is a copy)."""
    pg = page
    pg.set_viewport_size({"width": 1100, "height": 1400})
    pg.goto(server + "/")
    fid = pg.locator("#interesting a.feat").first.inner_text().lstrip("#")
    pg.goto(server + f"/sae/sae/feature/{fid}")
    pg.locator("#top .tok.peak").first.hover()
    path = ARTIFACTS / "serve" / "feature-page.png"
    pg.screenshot(path=str(path))
    assert path.stat().st_size > 20_000


@pytest.mark.integration
def test_real_run_feature_page_screenshot(request: pytest.FixtureRequest) -> None:
    """The README's picture: a feature page of a real run (MONOSCOPE_SERVE_RUN, default runs/small; feature
    MONOSCOPE_SERVE_FEATURE, default 5873), saved as tests/artifacts/serve/real-feature-page.png, with its
    ablation panel run on the real model (real-ablation.png)."""
    import uvicorn

    from monoscope.serve import create_app

    run = Path(os.environ.get("MONOSCOPE_SERVE_RUN", "runs/small"))
    fid = int(os.environ.get("MONOSCOPE_SERVE_FEATURE", "5873"))
    if not (run / "features" / "features.db").is_file():
        pytest.skip(f"no run with a features database at {run}")
    browser = request.getfixturevalue("browser")
    app = create_app(run)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        pg = browser.new_page(viewport={"width": 1100, "height": 1500})
        pg.goto(f"http://127.0.0.1:{sock.getsockname()[1]}/sae/sae/feature/{fid}")
        assert pg.locator("h1").inner_text().startswith(f"feature {fid}")
        pg.locator("#top .tok.peak").first.hover()
        out = ARTIFACTS / "serve"
        out.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(out / "real-feature-page.png"))
        # the per-token ablation effect on the real model, on the feature's top context (loads the model:
        # minutes on a loaded 2-core machine)
        pg.click("#ablateform button")
        pg.wait_for_selector("#ablateform[data-done='1']", timeout=600_000)
        toks = pg.locator("#ablateout .tok")
        assert toks.count() > 3 and toks.nth(1).get_attribute("title").startswith("loss change ")
        pg.locator("section:has(#ablateform)").screenshot(path=str(out / "real-ablation.png"))
        pg.goto(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        pg.wait_for_selector("canvas#featuremap[data-ready]")
        pg.screenshot(path=str(out / "real-run-page.png"), full_page=True)
        pg.close()
    finally:
        srv.should_exit = True
        th.join(10)
