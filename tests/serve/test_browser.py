"""End to end in headless Chromium: the page uploads, runs every task and shows the results.

Needs the Debian/Ubuntu ``chromium`` package and the ``playwright`` Python package (no browser download:
the system Chromium is driven directly). Screenshots go to ``test-artifacts/serve/``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from dinolab.curate.index import ExactIndex
from dinolab.serve.app import ServerThread, create_app
from dinolab.serve.gallery import PHOTOS, load_photo
from dinolab.serve.heads import load_depth_head
from dinolab.serve.settings import ServeSettings

from .conftest import photo, tiny_served
from .test_heads import _depth_head

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs: pip install playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("browser test needs Chromium: apt-get install -y --no-install-recommends chromium",
                allow_module_level=True)

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "serve"
LONG_NOTICE = ("Serving a stand-in model. For the official dinov2_vits14, download "
               "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth to "
               "~/.cache/dinolab/weights/"
               "dinov2_vits14_pretrain.pth and restart.")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    root = tmp / "photos"
    root.mkdir()
    names = ["chelsea", "coffee", "rocket", "astronaut"]
    for n in names:
        load_photo(n).save(root / f"{n}.png")
    feats = torch.randn(4, 192, generator=torch.Generator().manual_seed(0))
    index = ExactIndex(feats, [f"{n}.png" for n in names], model_id="tiny")
    heads = tiny_served("tiny", notice=LONG_NOTICE)
    heads.depth_head = load_depth_head(str(_depth_head(tmp / "depth.pth")), heads.backbone)
    heads.backbone.register_forward_pre_hook(lambda m, a: time.sleep(0.3))  # long enough to see the busy sign
    plain = tiny_served("plain", seed=1)
    app = create_app(ServeSettings(images_root=str(root)), models=[heads, plain], index=index)
    upload = tmp / "upload.png"
    photo(size=(160, 120)).save(upload)
    photo(size=(24, 18)).save(tmp / "small.png")
    (tmp / "broken.png").write_bytes(b"this is not an image\n")
    with ServerThread(app) as url:
        yield url, upload


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _run(page, task: str) -> None:
    page.check(f'input[name="task"][value="{task}"]')
    page.click("#run")
    page.wait_for_selector("#busy", state="visible", timeout=5000)
    page.wait_for_selector("#busy", state="hidden", timeout=60000)


def _wait(page, js: str, timeout: float = 30.0) -> None:
    """Poll ``js`` until true (``page.wait_for_function`` evaluates strings in the page, which the page's
    Content-Security-Policy forbids; ``page.evaluate`` runs outside it)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(js):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {js}")
        time.sleep(0.05)


def _results_shown(page, n: int) -> None:
    """Wait until exactly ``n`` result images are in the output and decoded by the browser."""
    _wait(page, "(() => { const imgs = Array.from(document.querySelectorAll('#output img.result-img'));"
          f" return imgs.length === {n} && imgs.every(i => i.complete && i.naturalWidth > 0); }})()")


def test_page_end_to_end(server, browser):
    url, upload = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors, outside = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    local = (url, "data:", "blob:")
    page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
    page.goto(url)
    _wait(page, "document.querySelector('#model-info').textContent.includes('Serving tiny')")
    page.wait_for_selector("#gallery .thumb img")

    page.set_input_files("#file1", str(upload))
    page.wait_for_selector("#preview1:not([hidden])")
    _run(page, "pca")
    _results_shown(page, 2)
    assert page.is_hidden("#error")
    page.screenshot(path=str(ARTIFACTS / "pca.png"), full_page=True)

    _run(page, "segment")
    _results_shown(page, 2)
    assert page.locator(".legend li").count() >= 2
    page.screenshot(path=str(ARTIFACTS / "segment.png"), full_page=True)

    _run(page, "depth")
    _results_shown(page, 1)
    assert "m, mean" in page.inner_text("#output")
    page.screenshot(path=str(ARTIFACTS / "depth.png"), full_page=True)

    page.select_option("#model", "plain")  # no depth head: depth cannot be chosen, and the page says why
    depth = page.locator('input[name="task"][value="depth"]')
    assert depth.is_disabled() and not depth.is_checked()
    assert page.is_checked('input[name="task"][value="pca"]')  # moved off the task that went away
    assert "--depth-head" in page.inner_text("#tasks")
    assert page.locator('#seg-mode option[value="head"]').is_disabled()  # no segmentation head either
    assert page.locator('input[name="task"][value="search"]').is_enabled()
    page.screenshot(path=str(ARTIFACTS / "depth-no-head.png"), full_page=True)

    page.select_option("#model", "tiny")
    assert page.locator('input[name="task"][value="depth"]').is_enabled()
    _run(page, "search")
    _wait(page, "document.querySelectorAll('.neighbours img').length === 4 && "
          "Array.from(document.querySelectorAll('.neighbours img')).every(i => i.naturalWidth > 0)")
    page.screenshot(path=str(ARTIFACTS / "search.png"), full_page=True)

    page.check('input[name="task"][value="match"]')
    page.click('#gallery .thumb[data-id="motorcycle_left"]')  # fills slot 1, then slot 2 is active
    page.click('#gallery .thumb[data-id="motorcycle_right"]')
    _run(page, "match")
    _results_shown(page, 1)
    assert "mutual nearest neighbours" in page.inner_text("#output")
    page.screenshot(path=str(ARTIFACTS / "match.png"), full_page=True)

    page.set_input_files("#file1", str(upload.parent / "broken.png"))  # a failed task after a result
    page.check('input[name="task"][value="pca"]')
    page.click("#run")
    page.wait_for_selector("#error:not([hidden])")
    page.wait_for_selector("#busy", state="hidden")
    assert page.is_visible("#error") and "not an image" in page.inner_text("#error")
    assert page.locator("#output img").count() == 0, "the previous result stayed under the error"
    page.screenshot(path=str(ARTIFACTS / "error.png"), full_page=True)
    page.close()
    assert not errors, errors
    assert not outside, f"the page fetched from elsewhere: {outside[:3]}"


def _no_sideways_scroll(page) -> None:
    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is {width[0]} px wide in a {width[1]} px window"


def test_phone_width_small_inputs_and_captions(server, browser):
    url, upload = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 375, "height": 740})
    page.goto(url)
    _wait(page, "document.querySelector('#model-info').textContent.includes('Serving tiny')")
    assert "https://dl.fbaipublicfiles.com" in page.inner_text("#notice")
    page.wait_for_selector("#gallery .thumb img")
    _no_sideways_scroll(page)

    captions = page.locator("#gallery .thumb .caption")
    assert captions.count() == len(PHOTOS) and captions.first.inner_text() == next(iter(PHOTOS.values()))

    page.set_input_files("#file1", str(upload.parent / "small.png"))  # 24 x 18 px
    _run(page, "pca")
    _results_shown(page, 2)
    sizes = page.evaluate("Array.from(document.querySelectorAll('#output figure img')).map(i => ["
                          "i.getBoundingClientRect().width, i.naturalWidth, getComputedStyle(i).imageRendering])")
    for shown, natural, rendering in sizes:
        assert natural == 24 and shown >= 240 and rendering == "pixelated", sizes
    _no_sideways_scroll(page)
    page.screenshot(path=str(ARTIFACTS / "phone-small-input.png"), full_page=True)
    page.close()
