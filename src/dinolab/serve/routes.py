"""The task endpoints of ``dinolab serve`` (``POST /v1/...``); see :mod:`dinolab.serve.app`.

Each route checks what it can before queueing (model name, input present, head/index configured),
then hands one job to the model thread: decode the upload, run the backbone, draw the pictures.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.responses import Response

from dinolab.serve import schemas, tasks
from dinolab.serve.inputs import ServeError

if TYPE_CHECKING:
    from dinolab.serve.app import Server
    from dinolab.serve.registry import ServedModel

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorResponse, "description": text} for code, text in (
        (400, "no input, or both an upload and a gallery id"), (404, "unknown model or gallery id"),
        (409, "the task needs something the server was not started with (a head, an index)"),
        (413, "upload too large (bytes or pixels)"), (415, "not an image"),
        (422, "corrupt, truncated or too small image, or bad parameters"), (503, "queue full"),
        (504, "timed out"))}
PICTURE = {200: {"content": {"image/png": {}}, "description": "JSON, or the main picture with ?format=png"}}

Format = Annotated[Literal["json", "png"], Query(description="json (pictures base64) or png (main picture)")]
ModelName = Annotated[str | None, Query(description="a name from /v1/models (default: the first)")]
ImageFile = Annotated[UploadFile | None, File(description="an image file (JPEG, PNG, GIF, BMP, TIFF, WebP)")]
GalleryId = Annotated[str | None, Form(description="a sample photo id from /v1/gallery instead of an upload")]
Image2 = Annotated[UploadFile | None, File(description="the second image")]
Gallery2 = Annotated[str | None, Form(description="or a sample photo id")]
Threshold = Annotated[float, Query(ge=-3, le=3, description="foreground cut on PC1, in std")]
ForegroundRule = Annotated[Literal["auto", "minority", "all"], Query(description="how PC1 is oriented")]
SegMode = Annotated[Literal["auto", "head", "unsupervised"],
                    Query(description="auto: the model's head if it has one, else unsupervised")]
Segments = Annotated[int, Query(ge=2, le=20, description="k of the unsupervised mode")]
TopK = Annotated[int, Query(ge=1, le=100, description="neighbours to return")]
FgOnly = Annotated[bool, Query(description="match PCA-foreground patches only")]
MaxMatches = Annotated[int, Query(ge=1, le=1000, description="matches listed and drawn")]

SEG_HINT = ("start the server with --seg-head NAME_OR_PATH (or `seg_head:` under the model in serve.yaml), "
            "e.g. dinov2_vits14_ade20k_linear or a `dinolab seg train` run folder; or use mode=unsupervised")
DEPTH_HINT = ("start the server with --depth-head NAME_OR_PATH (or `depth_head:` under the model in "
              "serve.yaml), e.g. dinov2_vits14_nyu_linear4 or the head.pth of a `dinolab depth train` run")
INDEX_HINT = ("build one with `dinolab embed photos/ --out emb/` and `dinolab index build --embeddings emb/ "
              "--out idx/`, then start the server with --index idx/ (and --images-root photos/ for "
              "thumbnails)")
TASK = {"responses": ERRORS, "tags": ["tasks"]}
PICTURE_TASK = {"responses": {**ERRORS, **PICTURE}, "tags": ["tasks"]}


def task_availability(srv: Server, m: ServedModel) -> dict[str, dict[str, Any]]:
    """What ``m`` can do on this server, for ``GET /v1/models`` (the page disables the rest):
    ``{task: {"available": bool, "reason": str | None}}``; ``segment_head`` is ``/v1/segment?mode=head``."""
    def state(reason: str | None) -> dict[str, Any]:
        return {"available": reason is None, "reason": reason}

    search = None
    if srv.index is None:
        search = "no retrieval index loaded (start the server with --index, see dinolab index build)"
    elif srv.index.dim != m.backbone.embed_dim:
        search = (f"the index holds {srv.index.dim}-dim features, {m.name} gives {m.backbone.embed_dim}-dim "
                  "ones (query with the model the index was built with)")
    seg_head = None if m.seg_head else "no segmentation head (start the server with --seg-head)"
    depth = None if m.depth_head else "no depth head (start the server with --depth-head)"
    return {"embed": state(None), "pca": state(None), "segment": state(None), "segment_head": state(seg_head),
            "depth": state(depth), "search": state(search), "match": state(None)}


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _hex(c: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*c)


def _reply(out: dict[str, Any], fmt: str) -> Response | dict[str, Any]:
    """``out`` holds the main picture's raw bytes under ``_png``: JSON with base64, or the bytes."""
    main = out.pop("_png")
    if fmt == "png":
        return Response(main, media_type="image/png")
    out["png"] = _b64(main)
    return out


def _base(m: ServedModel, size: tuple[int, int], grid: tuple[int, int]) -> dict[str, Any]:
    return {"model": m.name, "width": size[0], "height": size[1], "grid": [int(g) for g in grid]}


def _legend(labels: np.ndarray, names: list[str], colors: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    """Labels present in the map, largest first."""
    share = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
    return [{"id": int(i), "name": names[i], "color": _hex(colors[i]), "fraction": round(float(share[i]), 4)}
            for i in np.argsort(-share, kind="stable") if share[i] > 0]


def add_task_routes(app: FastAPI, srv: Server) -> None:
    """Register ``/v1/embed``, ``/v1/pca``, ``/v1/segment``, ``/v1/depth``, ``/v1/search``, ``/v1/match``."""

    @app.post("/v1/embed", response_model=schemas.EmbedResponse, **TASK)
    async def embed(image: ImageFile = None, gallery: GalleryId = None,
                    model: ModelName = None) -> dict[str, Any]:
        """CLS token and mean patch token of one image (at the model's dense resolution)."""
        m = srv.model(model)
        src = await srv.source(image, gallery, "image")

        def job() -> dict[str, Any]:
            img = srv.decode(src)
            e = tasks.embed(srv.features(m, img))
            return {**_base(m, tasks.display_image(img).size, e.grid), "dim": len(e.cls), "cls": e.cls,
                    "patch_mean": e.patch_mean, "input_size": list(e.input_size)}
        return await srv.run(job)

    @app.post("/v1/pca", response_model=schemas.PcaResponse, **PICTURE_TASK)
    async def pca(image: ImageFile = None, gallery: GalleryId = None, model: ModelName = None,
                  threshold: Threshold = 0.0, foreground: ForegroundRule = "auto",
                  format: Format = "json") -> Any:
        """The DINOv2 paper's PCA part colouring: PC1 separates the foreground, PCs 2-4 become RGB."""
        m = srv.model(model)
        src = await srv.source(image, gallery, "image")

        def job() -> dict[str, Any]:
            img = srv.decode(src)
            disp = tasks.display_image(img)
            r = tasks.pca_colors(srv.features(m, img), disp.size, threshold=threshold, foreground=foreground)
            return {**_base(m, disp.size, r.grid), "_png": tasks.png_bytes(r.colors),
                    "mask_png": _b64(tasks.png_bytes(r.mask)), "foreground_fraction": round(r.foreground, 4)}
        return _reply(await srv.run(job), format)

    @app.post("/v1/segment", response_model=schemas.SegmentResponse, **PICTURE_TASK)
    async def segment(image: ImageFile = None, gallery: GalleryId = None, model: ModelName = None,
                      mode: SegMode = "auto", segments: Segments = 6, format: Format = "json") -> Any:
        """Semantic segmentation by a trained head, or k-means segments of the patch features."""
        m = srv.model(model)
        if mode == "head" and m.seg_head is None:
            raise ServeError(409, f"model {m.name} has no segmentation head: {SEG_HINT}")
        head = m.seg_head if mode != "unsupervised" else None
        src = await srv.source(image, gallery, "image")

        def job() -> dict[str, Any]:
            img = srv.decode(src)
            disp = tasks.display_image(img)
            if head is not None:
                labels, grid = head.predict(img, disp.size)
                names, colors = head.classes, head.palette
            else:
                seg = tasks.kmeans_segments(srv.features(m, img), disp.size, segments)
                labels, grid, names, colors = seg.labels, seg.grid, seg.names, seg.colors
            color = tasks.colorize(labels, colors)
            return {**_base(m, disp.size, grid), "mode": "head" if head else "unsupervised",
                    "_png": tasks.png_bytes(tasks.blend(disp, color)),
                    "mask_png": _b64(tasks.png_bytes(color)), "legend": _legend(labels, names, colors),
                    "head": head.source if head else None}
        return _reply(await srv.run(job), format)

    @app.post("/v1/depth", response_model=schemas.DepthResponse, **PICTURE_TASK)
    async def depth(image: ImageFile = None, gallery: GalleryId = None, model: ModelName = None,
                    format: Format = "json") -> Any:
        """Monocular depth from the model's depth head (409 when it has none: depth is never faked)."""
        m = srv.model(model)
        if m.depth_head is None:
            raise ServeError(409, f"model {m.name} has no depth head: {DEPTH_HINT}")
        head = m.depth_head
        src = await srv.source(image, gallery, "image")

        def job() -> dict[str, Any]:
            img = srv.decode(src)
            disp = tasks.display_image(img)
            short = tasks.capped_short_side(img.width, img.height, m.short_side, m.max_side, m.patch_size)
            d, grid = head.predict(m.backbone, disp, short)
            return {**_base(m, disp.size, grid), "_png": tasks.png_bytes(tasks.colorize_depth(d)),
                    "min_depth": float(d.min()), "max_depth": float(d.max()), "mean_depth": float(d.mean()),
                    "head": head.source}
        return _reply(await srv.run(job), format)

    @app.post("/v1/match", response_model=schemas.MatchResponse, **PICTURE_TASK)
    async def match(image: ImageFile = None, gallery: GalleryId = None, image2: Image2 = None,
                    gallery2: Gallery2 = None, model: ModelName = None, foreground: FgOnly = False,
                    max_matches: MaxMatches = 60, format: Format = "json") -> Any:
        """Patch correspondences: mutual nearest neighbours of the two images' patch features."""
        from dinolab.viz.matching import match_patches

        m = srv.model(model)
        src1 = await srv.source(image, gallery, "image")
        src2 = await srv.source(image2, gallery2, "image2")

        def job() -> dict[str, Any]:
            a, b = srv.decode(src1), srv.decode(src2, "image2")
            short = min(tasks.capped_short_side(i.width, i.height, m.short_side, m.max_side, m.patch_size)
                        for i in (a, b))
            mm = match_patches(m.backbone, a, b, foreground=foreground, short_side=short)
            pic = tasks.draw_matches(tasks.display_image(a), tasks.display_image(b), mm.xy1, mm.xy2,
                                     (a.size, b.size), max_lines=max_matches)
            top = zip(mm.xy1[:max_matches], mm.xy2[:max_matches], mm.similarity[:max_matches])
            matches = [{"xy1": [round(float(v), 1) for v in p1], "xy2": [round(float(v), 1) for v in p2],
                        "similarity": round(float(sim), 5)} for p1, p2, sim in top]
            return {"model": m.name, "_png": tasks.png_bytes(pic), "n_matches": len(mm), "matches": matches,
                    "grid1": list(mm.grid1), "grid2": list(mm.grid2)}
        return _reply(await srv.run(job), format)

    _add_search_route(app, srv)


def _add_search_route(app: FastAPI, srv: Server) -> None:
    """``/v1/search``: the query is embedded with the index's own transform (``Server.query_transform``)."""

    @app.post("/v1/search", response_model=schemas.SearchResponse, **TASK)
    async def search(image: ImageFile = None, gallery: GalleryId = None, model: ModelName = None,
                     k: TopK = 8) -> dict[str, Any]:
        """Nearest indexed images by cosine similarity of CLS features (``dinolab index build``)."""
        m = srv.model(model)
        index = srv.index
        if index is None:
            raise ServeError(409, f"no retrieval index loaded: {INDEX_HINT}")
        if index.dim != m.backbone.embed_dim:
            built = index.model_id or "?"
            raise ServeError(409, f"the index holds {index.dim}-dim features (built with {built}) but model "
                             f"{m.name} gives {m.backbone.embed_dim}-dim ones: query with the model the "
                             "index was built with, or rebuild the index with this one")
        src = await srv.source(image, gallery, "image")
        resize, crop = srv.query_transform or (256, 224)

        def job() -> dict[str, Any]:
            img = srv.decode(src)
            q = tasks.query_feature(m.backbone, img, resize=resize, crop=crop)
            scores, rows = index.search(q[None], k)
            pairs = zip(scores[0].tolist(), rows[0].tolist())
            hits = [{"rank": r + 1, "id": index.ids[i], "score": round(float(sc), 5),
                     "thumbnail": f"/v1/index/items/{i}" if srv.images_root else None}
                    for r, (sc, i) in enumerate(pairs) if i >= 0]  # faiss: -1 = none
            warnings = []
            if index.model_id and index.model_id not in (m.name, m.model_id):
                warnings.append(f"the index was built with {index.model_id!r}; scores from {m.name} are "
                                "meaningful only if that is the same backbone")
            if not srv.query_transform_recorded:
                warnings.append(f"the index records no query transform; the query was embedded at resize "
                                f"{resize} / crop {crop}, which may not be how the index was embedded")
            grid = (crop // m.patch_size,) * 2
            return {**_base(m, tasks.display_image(img).size, grid), "neighbours": hits,
                    "index_size": len(index), "index_model": index.model_id,
                    "query_transform": {"resize": resize, "crop": crop},
                    "warning": "; ".join(warnings) or None}
        return await srv.run(job)
