"""``dinolab serve``: a web page and a JSON/HTTP API over the same backbones (FastAPI).

Routes (OpenAPI schema at ``/openapi.json``, interactive docs at ``/docs``; no ``/redoc``)::

    GET  /                      the demo page (static files, works offline)
    GET  /healthz               liveness + queue length
    GET  /v1/models             served models, heads, index, limits
    GET  /v1/gallery            sample photos (scikit-image) by id; /v1/gallery/{id} is the picture
    POST /v1/embed              CLS + mean patch token
    POST /v1/pca                PCA part colouring
    POST /v1/segment            segmentation: a trained head, or unsupervised k-means segments
    POST /v1/depth              depth from a depth head (409 without one)
    POST /v1/search             nearest images in a `dinolab index build` index (409 without one)
    POST /v1/match              patch correspondences between two images
    GET  /v1/index/items/{row}  thumbnail of an indexed image (by row number, never by path)

Inputs are multipart form fields: ``image`` (a file) or ``gallery`` (a sample id), plus ``image2`` /
``gallery2`` for ``/v1/match``. Options are query parameters (``?model=...&segments=6``).
Every error is ``{"detail": "..."}`` with a 4xx/5xx status; no request can take the server down.
Only the bound Host names are answered and other sites' pages cannot POST (``allowed_hosts``,
``allowed_origins``); replies carry no absolute server paths (:mod:`dinolab.serve.public`).

    app = create_app(models=[ServedModel.wrap(dinolab.create_model("vit_tiny_patch4", depth=2))])
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.middleware.trustedhost import TrustedHostMiddleware
from torch import nn

from dinolab.errors import DinolabError
from dinolab.serve import schemas, tasks
from dinolab.serve.gallery import PHOTOS, gallery_list, load_photo
from dinolab.serve.guards import (
    BodyLimitMiddleware,
    DeadlineMiddleware,
    ModelWorker,
    OriginCheckMiddleware,
    RequestLimitMiddleware,
)
from dinolab.serve.inputs import ServeError, decode_image
from dinolab.serve.public import PublicJSONResponse
from dinolab.serve.registry import ModelRegistry, ServedModel, resolve_models
from dinolab.serve.routes import ERRORS, add_task_routes, task_availability
from dinolab.serve.settings import ServeSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# The page loads nothing from elsewhere: no CDN, no external fonts (it must work offline).
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class Server:
    """Models, index, limits and the model queue behind one app (``app.state.server``)."""

    def __init__(self, settings: ServeSettings, registry: ModelRegistry, index: Any | None) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.registry = registry
        self.index = index
        self.images_root = Path(settings.images_root).resolve() if settings.images_root else None
        self.worker = ModelWorker(self.limits.max_queue)
        self.query_transform: tuple[int, int] | None = None  # (resize, crop) queries are embedded with
        self.query_transform_recorded = False
        if index is not None:
            from dinolab.curate.index import query_transform

            info = getattr(index, "info", {}) or {}
            self.query_transform = query_transform(info, settings.index_resize, settings.index_crop,
                                                   where="the served index")
            self.query_transform_recorded = info.get("resize") is not None and info.get("crop") is not None

    # ------------------------------------------------------------------------- inputs

    def model(self, name: str | None) -> ServedModel:
        try:
            return self.registry.get(name)
        except KeyError as e:
            raise ServeError(404, str(e.args[0])) from None

    async def source(self, upload: UploadFile | None, gallery: str | None, what: str) -> bytes | str:
        """The bytes of an upload, or a validated gallery id; exactly one must be given."""
        if upload is not None and gallery:
            raise ServeError(400, f"send either a file in '{what}' or a gallery id, not both")
        if gallery:
            if gallery not in PHOTOS:
                raise ServeError(404, f"unknown gallery id {gallery[:40]!r}; GET /v1/gallery lists them")
            return gallery
        if upload is None:
            field = "gallery" if what == "image" else "gallery2"
            raise ServeError(400, f"no input: send an image file in the form field '{what}' "
                             f"(multipart/form-data) or a sample photo id in '{field}'")
        return await upload.read(self.limits.max_bytes + 1)  # one byte over the limit is enough to refuse

    def decode(self, src: bytes | str, what: str = "image") -> Image.Image:
        """Runs on the model thread (one decode at a time bounds memory)."""
        if isinstance(src, str):
            return load_photo(src)
        return decode_image(src, max_bytes=self.limits.max_bytes, max_pixels=self.limits.max_pixels,
                            min_side=self.limits.min_side, what=what)

    async def run(self, job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``job`` on the model thread; adds ``timing_ms``. Library errors become 422."""
        def timed() -> dict[str, Any]:
            t0 = time.perf_counter()
            try:
                out = job()
            except (DinolabError, ValueError) as e:
                raise ServeError(422, " ".join(str(e).split())) from None
            out["timing_ms"] = round(1000 * (time.perf_counter() - t0), 1)
            return out
        return await self.worker.run(timed, self.limits.timeout_s)

    # ------------------------------------------------------------------------- tasks

    def features(self, m: ServedModel, img: Image.Image) -> tasks.Features:
        return tasks.forward(m.backbone, img, short_side=m.short_side, max_side=m.max_side)

    def index_info(self) -> dict[str, Any] | None:
        if self.index is None:
            return None
        resize, crop = self.query_transform or (None, None)
        transform = {"resize": resize, "crop": crop, "recorded": self.query_transform_recorded}
        return {"count": len(self.index), "dim": self.index.dim, "model_id": self.index.model_id,
                "thumbnails": self.images_root is not None, "query_transform": transform}

    def thumbnail_path(self, row: int) -> Path:
        """The indexed image of ``row``, only if it lies inside the configured image folder."""
        if self.index is None or self.images_root is None or not 0 <= row < len(self.index):
            raise ServeError(404, "no such indexed image (or the server was started without --images-root)")
        path = (self.images_root / self.index.ids[row]).resolve()
        if not path.is_relative_to(self.images_root) or not path.is_file():
            raise ServeError(404, f"indexed image {row} is not a file under the image folder")
        return path


def _load_index(settings: ServeSettings) -> Any | None:
    if not settings.index:
        return None
    from dinolab.curate.index import load_index

    return load_index(settings.index)  # exact or faiss (flat / IVF / HNSW / IVF-PQ)


def _as_registry(models: ModelRegistry | Iterable[ServedModel] | nn.Module) -> ModelRegistry:
    if isinstance(models, ModelRegistry):
        return models
    if isinstance(models, nn.Module):
        return ModelRegistry([ServedModel.wrap(models)])
    return ModelRegistry(models)


def create_app(settings: ServeSettings | None = None, *,
               models: ModelRegistry | Iterable[ServedModel] | nn.Module | None = None,
               index: Any | None = None, progress: bool = True) -> FastAPI:
    """The FastAPI app.

    Args:
        settings: limits, index, image folder, and the models to load when ``models`` is None.
        models: backbones to serve instead of loading ``settings.models`` (tests inject tiny ones).
        index: an ``ExactIndex`` or ``FaissIndex`` instead of loading ``settings.index``.
        progress: progress bars while loading (fallback pretraining, downloads).
    """
    settings = settings or ServeSettings()
    registry = _as_registry(models) if models is not None else resolve_models(settings, progress=progress)
    index = index if index is not None else _load_index(settings)
    for m in registry:
        if index is not None and index.dim != m.backbone.embed_dim:
            log.warning("the index holds %d-dim features but %s gives %d-dim ones: /v1/search with it will "
                        "be refused", index.dim, m.name, m.backbone.embed_dim)
    srv = Server(settings, registry, index)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        srv.worker.shutdown()

    # /redoc is off: it loads its script from a CDN (like /docs, which stays: it is the documented one)
    app = FastAPI(title="dinolab serve", version="1", lifespan=lifespan, summary="DINOv2 features over HTTP: "
                  "embeddings, PCA part colouring, segmentation, depth, retrieval and patch matching.",
                  redoc_url=None, default_response_class=PublicJSONResponse)
    app.state.server = srv
    lim = srv.limits  # middleware added last runs first: request limit, deadline, then the body guard
    app.add_middleware(BodyLimitMiddleware, max_bytes=2 * lim.max_bytes + 2**20,  # two images + the form
                       timeout_s=lim.body_timeout_s)
    app.add_middleware(DeadlineMiddleware, timeout_s=lim.timeout_s)
    app.add_middleware(RequestLimitMiddleware, max_requests=lim.requests_in_progress)
    app.add_middleware(OriginCheckMiddleware, allowed_origins=settings.allowed_origins)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(settings))  # runs first
    _error_handlers(app)
    _page_routes(app, srv)
    _info_routes(app, srv)
    add_task_routes(app, srv)
    return app


LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def allowed_hosts(settings: ServeSettings) -> list[str]:
    """Host header names the server answers to (anything else gets 400: DNS rebinding).

    The loopback names, ``settings.host`` (for a wildcard address: this machine's name and addresses),
    and ``settings.allowed_hosts`` (``*.example.com`` patterns; ``*`` turns the check off).
    """
    names = list(LOCAL_HOSTS)
    host = settings.host.strip()
    if host in WILDCARD_HOSTS:
        names += _machine_names()
    else:
        names.append(f"[{host.strip('[]')}]" if ":" in host else host)
    names += [h.strip() for h in settings.allowed_hosts if h.strip()]
    return list(dict.fromkeys(n.lower() for n in names))


def _machine_names() -> list[str]:
    """This machine's host name, fully qualified name and their addresses (best effort)."""
    names = [socket.gethostname(), socket.getfqdn()]
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        infos = []
    for *_, addr in infos:
        ip = str(addr[0])
        names.append(f"[{ip}]" if ":" in ip else ip)
    return [n for n in names if n]


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(_: Request, e: ServeError) -> JSONResponse:
        return PublicJSONResponse({"detail": e.detail}, status_code=e.status)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        """The server stays up; the log has the trace, the client a one-line answer."""
        log.exception("unexpected error")
        detail = f"internal error ({type(e).__name__}); see the server log"
        return PublicJSONResponse({"detail": detail}, status_code=500)


def _page_routes(app: FastAPI, srv: Server) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                            "X-Content-Type-Options": "nosniff",
                                                            "Cache-Control": "no-store"})


@functools.lru_cache(maxsize=64)
def _thumbnail(photo_id: str, size: int) -> bytes:
    img = load_photo(photo_id).copy()
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def _info_routes(app: FastAPI, srv: Server) -> None:
    @app.get("/healthz", response_model=schemas.HealthResponse, tags=["info"])
    async def healthz() -> dict[str, Any]:
        """Liveness: the served model names and the queue."""
        return {"status": "ok", "models": srv.registry.names(), "queued": srv.worker.pending,
                "completed": srv.worker.completed}

    @app.get("/v1/models", response_model=schemas.ModelsResponse, tags=["info"])
    async def models() -> dict[str, Any]:
        """Served models (source, size, heads, the tasks each can run here and why not, and how to get the
        official weights when on the fallback), the index and the limits."""
        lim = srv.limits
        models = [{**m.info(), "tasks": task_availability(srv, m)} for m in srv.registry]
        return {"default": srv.registry.default.name, "models": models,
                "index": srv.index_info(),
                "limits": {"max_upload_bytes": lim.max_bytes, "max_pixels": lim.max_pixels,
                           "min_side": lim.min_side, "timeout_s": lim.timeout_s, "max_queue": lim.max_queue,
                           "header_timeout_s": lim.header_timeout_s, "body_timeout_s": lim.body_timeout_s,
                           "max_requests": lim.requests_in_progress}}

    @app.get("/v1/gallery", response_model=list[schemas.GalleryItem], tags=["info"])
    async def gallery() -> list[dict[str, Any]]:
        """Sample photos bundled with scikit-image, usable as ``gallery=<id>`` instead of an upload."""
        return [{**g, "url": f"/v1/gallery/{g['id']}"} for g in gallery_list()]

    jpeg = {200: {"content": {"image/jpeg": {}}}, **ERRORS}

    @app.get("/v1/gallery/{photo_id}", tags=["info"], responses=jpeg)
    async def gallery_photo(photo_id: str, size: Annotated[int, Query(ge=32, le=1024)] = 512) -> Response:
        """A sample photo as JPEG, long side at most ``size``."""
        if photo_id not in PHOTOS:
            raise ServeError(404, f"unknown gallery id {photo_id[:40]!r}; GET /v1/gallery lists them")
        return Response(_thumbnail(photo_id, size), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/v1/index/items/{row}", tags=["info"], responses=jpeg)
    async def index_item(row: int, size: Annotated[int, Query(ge=32, le=512)] = 160) -> Response:
        """Thumbnail of the indexed image in ``row`` (needs --images-root)."""
        from starlette.concurrency import run_in_threadpool

        from dinolab.data.images import load_rgb

        path = srv.thumbnail_path(row)

        def encode() -> bytes:
            img = load_rgb(path)
            img.thumbnail((size, size), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            return buf.getvalue()
        try:
            return Response(await run_in_threadpool(encode), media_type="image/jpeg")
        except DinolabError as e:
            raise ServeError(422, f"indexed image {row} cannot be decoded: {e}") from None




# ---------------------------------------------------------------------------------------- running


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one); ``DinolabError`` when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DinolabError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port "
                           "(or --port 0 for any free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port/`` of a bound socket (``localhost`` shown for the wildcard address)."""
    host, port = sock.getsockname()[:2]
    host = "localhost" if host in ("0.0.0.0", "::") else host
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _uvicorn_server(app: FastAPI, settings: ServeSettings, log_level: str) -> Any:
    """uvicorn on its h11 protocol with a header deadline and a connection cap (``serve.connections``);
    the request cap is ASGI middleware (uvicorn's ``limit_concurrency`` counts idle connections too)."""
    import uvicorn

    from dinolab.serve.connections import guarded_protocol

    lim = settings.limits
    config = uvicorn.Config(app, log_level=log_level, timeout_keep_alive=5, access_log=log_level == "debug",
                            http=guarded_protocol(lim.header_timeout_s, lim.max_connections))
    return uvicorn.Server(config)


def serve(settings: ServeSettings, *, announce: Callable[[str], None] = log.info, progress: bool = True,
          log_level: str = "info") -> None:
    """Bind, load the models (pretraining the fallback first if needed), announce the URL, serve until
    Ctrl-C. The port is taken before the models load, so a busy port fails at once."""
    sock = bind_socket(settings.host, settings.port)
    try:
        app = create_app(settings, progress=progress)
        if settings.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s: the demo is reachable from other machines; it answers to the "
                        "host names %s (--allowed-hosts adds more)", settings.host,
                        ", ".join(allowed_hosts(settings)))
        url = url_of(sock)
        announce(f"dinolab serve: open {url}  (API docs: {url}docs; Ctrl-C stops)")
        _uvicorn_server(app, settings, log_level).run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """Run an app with uvicorn on a loopback port in a background thread (tests, benchmarks)::

        with ServerThread(app) as url:
            httpx.get(url + "healthz")
    """

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server: Any = None
        self.url = ""

    def __enter__(self) -> str:
        import threading

        sock = bind_socket(self.host, self.port)
        self.url = url_of(sock)
        srv = self.app.state.server
        self.server = _uvicorn_server(self.app, srv.settings, self.log_level)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self._sock = sock
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
