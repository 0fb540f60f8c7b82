"""JSON shapes of the HTTP API (they also make the OpenAPI schema at ``/openapi.json`` and ``/docs``).

Pictures travel as base64-encoded PNG strings (``png``, ``mask_png`` ...); every picture endpoint
also answers ``?format=png`` with the main picture as ``image/png`` bytes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong with the request and what to send instead")


class Result(BaseModel):
    model: str = Field(description="name of the model that answered")
    width: int = Field(description="width of the returned pictures (the input, scaled to a long side <= 768)")
    height: int
    grid: list[int] = Field(description="patch grid (rows, columns) the backbone produced")
    timing_ms: float = Field(description="time spent on the model thread")


class EmbedResponse(Result):
    dim: int
    cls: list[float] = Field(description="final-normed CLS token")
    patch_mean: list[float] = Field(description="mean of the final-normed patch tokens")
    input_size: list[int] = Field(description="(height, width) the backbone saw")


class PcaResponse(Result):
    png: str = Field(description="PCA part colouring (RGB = components 2-4 of the foreground), base64 PNG")
    mask_png: str = Field(description="foreground mask from the first component, base64 PNG")
    foreground_fraction: float


class LegendEntry(BaseModel):
    id: int
    name: str
    color: str = Field(description="#rrggbb")
    fraction: float = Field(description="share of the picture with this label")


class SegmentResponse(Result):
    mode: str = Field(description="'head' (a trained head: class names) or 'unsupervised' (k-means segments)")
    png: str = Field(description="label colours laid over the image, base64 PNG")
    mask_png: str = Field(description="label colours alone, base64 PNG")
    legend: list[LegendEntry]
    head: str | None = Field(None, description="the head used (mode 'head')")


class DepthResponse(Result):
    png: str = Field(description="colourised depth (bright = near), base64 PNG")
    min_depth: float = Field(description="metres")
    max_depth: float
    mean_depth: float
    head: str


class Neighbour(BaseModel):
    rank: int
    id: str = Field(description="the id stored in the index (a path relative to its image folder)")
    score: float = Field(description="cosine similarity")
    thumbnail: str | None = Field(None, description="thumbnail URL (when the server knows the image folder)")


class SearchResponse(Result):
    neighbours: list[Neighbour]
    index_size: int
    index_model: str
    query_transform: dict[str, int] = Field(description="resize / crop the query was embedded with (the "
                                            "index's own, so an indexed image scores 1.0 against itself)")
    warning: str | None = None


class Match(BaseModel):
    xy1: list[float] = Field(description="patch centre in image 1, pixels of the original image (x, y)")
    xy2: list[float]
    similarity: float


class MatchResponse(BaseModel):
    model: str
    png: str = Field(description="both images side by side with a line per match, base64 PNG")
    n_matches: int
    matches: list[Match] = Field(description="mutual nearest neighbours, best first (at most max_matches)")
    grid1: list[int]
    grid2: list[int]
    timing_ms: float


class ModelsResponse(BaseModel):
    default: str
    models: list[dict[str, Any]] = Field(description="per model: name, kind, source, sizes, heads, and "
                                         "`tasks`: {task: {available, reason}} for embed, pca, segment, "
                                         "segment_head, depth, search, match")
    index: dict[str, Any] | None
    limits: dict[str, Any]


class HealthResponse(BaseModel):
    status: str
    models: list[str]
    queued: int
    completed: int


class GalleryItem(BaseModel):
    id: str
    title: str
    width: int
    height: int
    url: str
