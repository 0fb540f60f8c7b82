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
