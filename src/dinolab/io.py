"""Atomic file writes: everything a job leaves on disk goes through a temp file and ``os.replace``,
so a killed process never leaves a half-written checkpoint, array, figure or JSON behind.

Files get the permissions an ordinary ``open(path, "w")`` would give them (``0o666`` less the
process umask), not the owner-only ``0o600`` of the temp file. JSON is strict: a NaN or an infinity
is refused (``DinolabError`` naming the file and the key), since ``NaN`` is not JSON; metrics that can
be undefined (a class absent from a split) pass through :func:`json_safe` first, which writes null.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any

from dinolab.errors import DinolabError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Permission bits of a new regular file: ``0o666`` less the umask (``0o644`` under umask 022)."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, fsync: bool = True) -> Path:
    """Call ``write(f)`` on a temp file in ``path``'s folder, fsync it, then rename it over ``path``.
    The file gets the umask's permissions (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8; undecodable file-name bytes kept via surrogateescape) atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8", errors="surrogateescape")))


def _nonfinite_key(obj: Any, where: str = "") -> str | None:
    """The key path (e.g. ``[0].neighbours[2].score``) of the first NaN/inf float in ``obj``, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "(top level)")
    if isinstance(obj, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    return next((hit for key, v in items if (hit := _nonfinite_key(v, key)) is not None), None)


def json_dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` that refuses NaN and infinities (``DinolabError`` naming the key); numpy/torch
    scalars go through ``float``. ``kw`` as ``json.dumps`` (e.g. ``indent``)."""
    try:
        return json.dumps(obj, allow_nan=False, default=float, **kw)
    except ValueError as e:
        if "JSON compliant" not in str(e):
            raise
        key = _nonfinite_key(json.loads(json.dumps(obj, default=float)))
        raise DinolabError(f"refusing to write a non-finite number (NaN or inf) at {key or 'some key'} into "
                           "JSON") from None


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None (JSON null): for values that can be undefined,
    such as the IoU of a class absent from a split. Dicts, lists and tuples are copied."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON atomically (numpy/torch scalars via ``float``); a NaN or
    inf raises ``DinolabError`` naming ``path`` and the key, and nothing is written."""
    try:
        text = json_dumps(obj, indent=1)
    except DinolabError as e:
        raise DinolabError(f"{path}: {e}") from None
    return atomic_write_text(path, text + "\n")


def atomic_save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), fsync=False)


def _clean(part: str) -> str:
    part = re.sub(r"[^\w.\- ]", "_", part).strip() or "_"
    return "_" + part if part.startswith(".") else part


def _id_parts(image_id: str) -> tuple[list[str], bool]:
    """The id's path parts without root, ``.``, ``..``; and whether it points outside its folder
    (absolute, or climbing with ``..``)."""
    raw = PurePosixPath(str(image_id).replace("\\", "/"))
    outside = raw.is_absolute() or ".." in raw.parts
    return [q for q in raw.parts if q not in ("", ".", "..", "/")] or ["image"], outside


def safe_relpath(image_id: str) -> str:
    """An image id (relative path, list-file line or path as given) as a relative output path that
    stays inside the output folder: its folders and its extension kept (``a/ok.bmp`` stays distinct
    from ``a/ok.tiff``), ``..``, the root and empty parts dropped, characters other than letters,
    digits, ``.``, ``-``, ``_`` and space replaced by ``_``, no hidden names."""
    return "/".join(_clean(q) for q in _id_parts(image_id)[0])


def unique_output_names(image_ids: Sequence[str], suffix: str = "") -> list[str]:
    """One distinct relative output path per image id, ``safe_relpath(id) + suffix``: relative ids
    keep their folders; ids outside their folder (absolute paths, ``..``) keep only as many trailing
    folders as tell them apart (``/data/a/x.jpg``, ``/data/b/x.jpg`` -> ``a/x.jpg``, ``b/x.jpg``).
    What still collides (case-insensitively, for file systems that fold case) gets ``~2``, ``~3`` ...
    before the suffix."""
    split = [_id_parts(i) for i in image_ids]
    keep = [1 if outside else len(parts) for parts, outside in split]
    while True:
        names = ["/".join(_clean(q) for q in parts[-k:]).lower() for (parts, _), k in zip(split, keep)]
        counts: dict[str, int] = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        grow = [j for j, n in enumerate(names) if counts[n] > 1 and keep[j] < len(split[j][0])]
        if not grow:
            break
        for j in grow:
            keep[j] += 1
    seen: set[str] = set()
    out = []
    for (parts, _), k in zip(split, keep):
        base = "/".join(_clean(q) for q in parts[-k:])
        name, n = base + suffix, 1
        while name.lower() in seen:
            n += 1
            name = f"{base}~{n}{suffix}"
        seen.add(name.lower())
        out.append(name)
    return out


def read_json_object(path: str | os.PathLike, what: str = "an object") -> dict[str, Any]:
    """A JSON file holding an object; one-line ``DinolabError`` naming the file otherwise (unreadable,
    not JSON, or another JSON type)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DinolabError(f"cannot read {path} as JSON: {' '.join(str(e).split())}") from None
    if not isinstance(obj, dict):
        raise DinolabError(f"{path} holds a JSON {type(obj).__name__}, not {what}")
    return obj
