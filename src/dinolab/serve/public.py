"""What the server says about itself: replies carry no absolute server paths.

Model sources, head files, index model ids and error messages often hold file paths
(``/home/me/runs/pretrain/teacher_backbone.pth``); a web page, or another site reading the API, must not
learn the server's directory layout or user name from them. :func:`public_text` rewrites every absolute
path in a string — relative to the working directory when it lies inside it, ``~/...`` under the home
folder, else its file name alone — and :class:`PublicJSONResponse` applies it to every string of every
JSON reply (base64 pictures excepted), so new fields cannot leak a path by accident.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

# an absolute POSIX path: a "/" that does not continue a word, a URL ("https://host/x") or a relative
# path, followed by path characters; the server's own routes (/v1/..., /static/...) are not paths
_ROUTES = r"(?:v1|static|docs|healthz|openapi\.json)(?![^/\s])"
_PATH = re.compile(rf"(?<![\w:/.~%+=-])/(?!{_ROUTES})[^\s'\"()\[\]{{}},;<>|*?`]+")


def _public_path(path: str) -> str:
    tail = ""
    while path and path[-1] in ".:":  # sentence punctuation after the path
        tail, path = path[-1] + tail, path[:-1]
    p = Path(os.path.normpath(path))
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        try:
            rel = p.relative_to(base)
        except ValueError:
            continue
        if str(rel) != ".":
            return prefix + str(rel) + tail
    return (p.name or "/") + tail


def public_text(text: str) -> str:
    """``text`` with every absolute path made relative (to the working or home folder) or cut to its name."""
    return _PATH.sub(lambda m: _public_path(m.group(0)), text) if "/" in text else text


def public(value: Any, key: str = "") -> Any:
    """``value`` (JSON data) with :func:`public_text` applied to its strings; keys ending in ``png`` hold
    base64 pictures and are left alone."""
    if isinstance(value, str):
        return value if key.endswith("png") else public_text(value)
    if isinstance(value, dict):
        return {k: public(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public(v, key) for v in value]
    return value


class PublicJSONResponse(JSONResponse):
    """A ``JSONResponse`` whose strings go through :func:`public` (the app's default response class)."""

    def render(self, content: Any) -> bytes:
        return super().render(public(content))
