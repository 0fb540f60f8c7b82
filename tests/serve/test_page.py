"""The demo page: served with a strict CSP, self-contained (no CDN, no external fonts), wired up."""

from __future__ import annotations

import re

from dinolab.serve.app import STATIC


def test_page_is_served_with_a_self_only_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    for name, ctype in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and ctype in r.headers["content-type"]
    assert client.get("/static/../app.py").status_code == 404


def test_static_files_load_nothing_from_elsewhere():
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        absolute_url = r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}"
        assert not re.search(absolute_url, text, re.IGNORECASE), name
        assert "@import" not in text and "@font-face" not in text, name
        assert not re.search(r"<script[^>]*>\s*[^<\s]", text), f"{name}: inline script (the CSP forbids it)"
        assert not re.search(r"\sstyle=\"", text), f"{name}: inline style attribute (the CSP forbids it)"


def test_every_element_the_script_uses_exists():
    html = (STATIC / "index.html").read_text()
    js = (STATIC / "app.js").read_text()
    ids = set(re.findall(r'id="([^"]+)"', html))
    used = set(re.findall(r'\$\("([^"$`]+)"\)', js))
    used |= {f"{p}{n}" for p in re.findall(r"\$\(`([a-z]+)\$\{", js) for n in (1, 2)}
    assert used and used <= ids, sorted(used - ids)
    for task in ("pca", "segment", "depth", "search", "match"):
        assert f'value="{task}"' in html


def test_page_rules_the_browser_test_checks_hold_in_the_files():
    """What test_browser.py checks in Chromium, checked in the served files (no browser needed)."""
    css = (STATIC / "style.css").read_text()
    js = (STATIC / "app.js").read_text()
    # small pictures enlarged with visible pixels; long words (the weights URL) wrap on a phone
    assert "image-rendering: pixelated" in css and re.search(r"body \{[^}]*overflow-wrap: anywhere", css)
    assert "function readable" in js and "naturalWidth" in js
    # a failed task clears the output: every error path of run() goes through failed()
    run = js[js.index("async function run()"):js.index("// ---", js.index("async function run()"))]
    assert "showError(" not in run.replace('showError("")', "") and run.count("failed(") == 3
    assert "out.replaceChildren(" in js[js.index("function failed"):js.index("async function getJSON")]
    # tasks the server cannot run are disabled, with its reason; gallery thumbnails have captions
    assert "radio.disabled = !a.available" in js and "m.tasks" in js
    assert 'class: "caption"' in js


def test_models_say_which_tasks_each_model_can_run(client):
    (m,) = client.get("/v1/models").json()["models"]
    tasks = m["tasks"]
    assert set(tasks) == {"embed", "pca", "segment", "segment_head", "depth", "search", "match"}
    for t in ("embed", "pca", "segment", "match"):
        assert tasks[t] == {"available": True, "reason": None}
    assert tasks["depth"]["available"] is False and "--depth-head" in tasks["depth"]["reason"]
    assert tasks["segment_head"]["available"] is False and "--seg-head" in tasks["segment_head"]["reason"]
    assert tasks["search"]["available"] is False and "--index" in tasks["search"]["reason"]
